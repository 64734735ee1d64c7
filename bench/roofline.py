"""The device's ceilings, measured first: copy bandwidth (GB/s) and the bf16 matmul rate (TFLOP/s).

    python bench/roofline.py --json OUT.json           # on a GPU: 2 GiB copy, 8192^3 bf16 matmul
    python bench/roofline.py --smoke --json OUT.json   # tiny sizes (CPU), same code

Copy bandwidth: `y = -x` over a random bf16 buffer (one read and one write of every byte), counted as
2 * bytes / time. Matmul: random bf16 [N, N] @ [N, N] with fp32 accumulation, 2 * N^3 FLOPs per call.
Timing (`median_seconds_per_call`, shared with the other bench scripts): after warm-up calls, each repeat
dispatches `calls` calls back to back and waits once with `block_until_ready` (asynchronous dispatch hides
the launch overhead); the result is the median over repeats of time / calls. Inputs are random, never
zeros (hardware and compilers can shortcut zeros).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench._report import write_json  # noqa: E402


def median_seconds_per_call(fn, args, *, warmup=2, repeats=5, calls=10):
    """Median over `repeats` of (wall time of `calls` back-to-back calls, synchronized at the end) / calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def random_array(key, shape, dtype):
    """Standard-normal data in `dtype` (never zeros)."""
    return jax.jit(lambda k: jax.random.normal(k, shape, dtype))(key)


def copy_bandwidth(nbytes: int, *, warmup=2, repeats=5, calls=10) -> dict:
    """Bytes moved per second by an elementwise negation of a random bf16 buffer (read + write)."""
    n = max(nbytes // 2, 1024)
    x = random_array(jax.random.key(1), (n,), jnp.bfloat16)
    neg = jax.jit(jnp.negative)
    t = median_seconds_per_call(neg, (x,), warmup=warmup, repeats=repeats, calls=calls)
    moved = 2 * n * 2
    return {"buffer_bytes": n * 2, "seconds": t, "bytes_per_s": moved / t, "gb_per_s": moved / t / 1e9}


def matmul_rate(n: int, dtype=jnp.bfloat16, *, warmup=2, repeats=5, calls=10) -> dict:
    """FLOP/s of a random [n, n] @ [n, n] matmul in `dtype` (fp32 accumulation)."""
    ka, kb = jax.random.split(jax.random.key(2))
    a = random_array(ka, (n, n), dtype)
    b = random_array(kb, (n, n), dtype)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype))
    t = median_seconds_per_call(mm, (a, b), warmup=warmup, repeats=repeats, calls=calls)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": jnp.dtype(dtype).name, "seconds": t, "flops_per_s": flops / t,
            "tflops": flops / t / 1e12}


def device_description() -> dict:
    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__}
    try:
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            info["memory_bytes_limit"] = int(stats["bytes_limit"])
    except Exception:  # noqa: BLE001 (memory_stats is unsupported on some backends)
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU): checks the script end to end")
    p.add_argument("--copy-bytes", type=int, default=2 << 30)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.copy_bytes, args.matmul_n, args.repeats, args.calls = 8 << 20, 256, 3, 2
    result = {"device": device_description(),
              "copy": copy_bandwidth(args.copy_bytes, repeats=args.repeats, calls=args.calls),
              "matmul_bf16": matmul_rate(args.matmul_n, repeats=args.repeats, calls=args.calls),
              "smoke": args.smoke}
    print(f"{result['device']['device_kind']}: copy {result['copy']['gb_per_s']:.1f} GB/s "
          f"({result['copy']['buffer_bytes'] / 2**20:.0f} MiB buffer), bf16 matmul "
          f"{result['matmul_bf16']['tflops']:.2f} TFLOP/s (n={args.matmul_n})")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
