"""Compiling a jitted function for many argument shapes ahead of time, concurrently, without running it.

`compile_ahead(jitted, calls)` lowers `jitted(*args, **kwargs)` for each call on the caller's thread (tracing is
Python: it holds the GIL) and hands each lowered program to a thread pool as soon as it is lowered, where XLA compiles
it (XLA releases the GIL while it compiles, so compiles overlap each other and the next lowering; how many at
once: `default_workers`). Nothing runs: no
device memory is touched and donated arguments stay alive, so programs that donate a shared buffer (the engine's
page pool) compile side by side. The compiled executables land in jit's own caches (JAX's lowering and compilation
caches are keyed by the traced program and argument shardings), so a later call of `jitted` with arguments of the
same shapes, dtypes and placements compiles nothing: pass the arguments the real calls pass (arrays, or
`jax.ShapeDtypeStruct`s with the same shardings).
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

# Each compile holds its own compiler memory (GBs for a 14B TPU program): not one thread per core of a 200-core host.
MAX_DEFAULT_WORKERS = 8


def _usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(n_programs: int) -> int:
    """Compile threads: one per two CPU cores, at most MAX_DEFAULT_WORKERS and one per program. One XLA:CPU compile
    already spreads its code generation over about three threads (measured), so on a 2-core machine a second
    compile thread only competes with the first (bench/serve_startup.py: 0.74-0.89x of one thread there)."""
    return max(1, min(n_programs, _usable_cores() // 2, MAX_DEFAULT_WORKERS))


def compile_ahead(jitted, calls, *, workers: int | None = None, progress: bool = False,
                  desc: str = "compiling programs") -> list:
    """Compiles `jitted` for each (args, kwargs) in `calls` (lowered here, compiled on `workers` threads; default
    `default_workers`); a tqdm bar counting compiled programs with `progress`. Returns the `jax.stages.Compiled`
    executables in the order of `calls`; the first error (a lowering's or a compile's, or a KeyboardInterrupt)
    cancels the compiles not yet started and propagates once those already running have finished."""
    calls = list(calls)
    workers = default_workers(len(calls)) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(calls), desc=desc, unit="program", dynamic_ncols=True)
    futures = []
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compile") as pool:
            try:
                for args, kwargs in calls:
                    if any(f.done() and f.exception() is not None for f in futures):
                        break
                    lowered = jitted.lower(*args, **kwargs)
                    future = pool.submit(lowered.compile)
                    if bar is not None:
                        future.add_done_callback(lambda _: bar.update(1))
                    futures.append(future)
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:   # after an error (or Ctrl-C) the queued compiles never start; the pool then waits for the rest
                pool.shutdown(wait=False, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()
    failed = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    if failed:
        raise failed[0]
    return [f.result() for f in futures]
