"""The serving engine's start-up time, each start in a fresh process: compiled ahead of time on one thread, on one
thread per core, on the default threads, and a second start with `--compile-cache` (JAX's persistent compilation
cache).

    python bench/serve_startup.py --size 87m --max-batch 32 --max-context 128

Each start builds the random model (`bench.random_models`, not timed), then times `ContinuousBatchingEngine(...)` and
`warmup` (every program of `program_shapes` compiled, what `python -m phi4_jax.serve` does before it listens) and
counts XLA compiles and persistent-cache hits with JAX's monitoring events; CPU seconds are the process's (all
threads), the measure that a loaded machine disturbs least. `bench/serve.py` runs these starts for
its model and engine and reports them in BENCHMARKS.md's Serving section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.random_models import SIZES  # noqa: E402

RESULT = "startup-result: "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-context", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--one", action="store_true", help="time one start in this process (what each child runs)")
    p.add_argument("--workers", type=int, default=None,
                   help="with --one: compile threads (default: compile_ahead.default_workers)")
    p.add_argument("--compile-cache", default=None, metavar="DIR", help="with --one: the persistent cache")
    return p.parse_args(argv)


def one_start(args) -> dict:
    """Times one engine start in this process (see the module docstring)."""
    if args.compile_cache:
        from phi4_jax.inference.compile_cache import use_compile_cache
        use_compile_cache(args.compile_cache)
    import jax

    from bench.random_models import random_model_pair
    from phi4_jax.inference.batching import ContinuousBatchingEngine
    from phi4_jax.model.decoder import model_from_params

    _, params, config = random_model_pair(args.size)
    model = model_from_params(config, params)
    jax.block_until_ready(params)
    counts = {"compiles": 0, "cache_hits": 0}

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["compiles"] += 1

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            counts["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    start, cpu = time.perf_counter(), time.process_time()
    engine = ContinuousBatchingEngine(model, max_batch=args.max_batch, max_context=args.max_context,
                                      prefill_chunk=args.prefill_chunk)
    engine.warmup(workers=args.workers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    # compiles counts every XLA compile of the start (a persistent-cache load is one too); cache_hits the loads
    return {"seconds": seconds, "cpu_seconds": cpu, "programs": len(engine.program_shapes()), **counts}


def startup_times(size: str, max_batch: int, max_context: int, prefill_chunk: int = 128) -> list[dict]:
    """Engine starts, each in a fresh process: (label, result of `one_start`) on one compile thread, on one per core
    and on the default number (`compile_ahead.default_workers`), then a default start writing a new compile cache
    and a second start reading it."""
    from phi4_jax.inference.compile_ahead import default_workers

    base = [sys.executable, os.path.abspath(__file__), "--one", "--size", size, "--max-batch", str(max_batch),
            "--max-context", str(max_context), "--prefill-chunk", str(prefill_chunk)]
    default = default_workers(10**6)
    runs = [(f"cold, {n} compile thread{'s' * (n > 1)}{' (default)' * (n == default)}", ["--workers", str(n)])
            for n in sorted({1, os.cpu_count() or 1, default})]
    rows = []
    with tempfile.TemporaryDirectory(prefix="phi4_jax_compile_cache_") as cache:
        runs += [("cold, default threads, writing --compile-cache", ["--compile-cache", cache]),
                 ("second start, reading --compile-cache", ["--compile-cache", cache])]
        for label, extra in runs:
            proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"start-up run {label!r} failed: {proc.stderr[-2000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT))
            rows.append({"label": label, **json.loads(line[len(RESULT):])})
            print(f"start-up, {label}: {rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def startup_table(rows: list[dict]) -> list[str]:
    """The Markdown table of `startup_times`' rows."""
    lines = ["| engine start | programs | XLA compiles | loaded from the cache | seconds | vs 1 thread | CPU seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['programs']} | {r['compiles'] - r['cache_hits']} | {r['cache_hits']} | "
                     f"{r['seconds']:.1f} | {rows[0]['seconds'] / r['seconds']:.2f}x | {r['cpu_seconds']:.1f} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(RESULT + json.dumps(one_start(args)), flush=True)
        return 0
    print("\n".join(startup_table(startup_times(args.size, args.max_batch, args.max_context, args.prefill_chunk))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
