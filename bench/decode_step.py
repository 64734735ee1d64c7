"""The serving engine's compiled CPU decode step, A/B of layouts and dtypes, alternating in one process.

    python bench/decode_step.py --sizes 87m-8k,87m --batches 1,8
    python bench/decode_step.py --variants plain,cpu     # the weight-layout A/B of 2026-12-01 20:29

For each model and batch, engines (`ContinuousBatchingEngine`, max_batch = the batch) are built and their decode
step (`engine_step`: every row decoding one token at position ~250 of a 384-token context, greedy) is timed
directly, with no host loop around it, for each variant of the same random weights:
- "plain": float32, per-layer arrays with q/k/v and gate/up fused (the engine's CPU layout before `cpu_weights`);
- "cpu": float32, the engine's own `per_layer_params` (`MatrixWeight`s: native packed panels where
  `kernels.cpu_native` builds, else [K, N] matrices and the lm_head also transposed);
- "cpu-xla": as "cpu" with XLA's dots for the weight products (`per_layer_params(native=False)`); the native paged
  attention, argmax and top-k/top-p filter stay (they follow the library's availability: run with PHI4_JAX_NATIVE_CPU=0 for XLA's
  ops throughout); "cpu-bf16-xla" likewise in bfloat16;
- "cpu-bf16": the same in bfloat16 (params, compute and pages; the pool kept as uint16 bits, `PageBits`);
- "cpu-bf16-array-pool": as "cpu-bf16" but the pool as plain bfloat16 arrays (the pool before `PageBits`);
- "cpu-xla-masks": as "cpu" with XLA's top-k/top-p masks instead of the native filter (`sampling_filter`), for
  sampled steps (`--temperature 0.8 --top-p 0.9`): the step compiled separately with the filter unavailable.
With `--temperature` (and `--top-p`, `--top-k`) every row samples with those settings instead of taking the
greedy token. The variants alternate in rounds, so machine load hits all alike; the table reports the median and
10th-percentile wall time and the median process CPU time (both threads; less sensitive to other jobs on the machine than wall
time) per step, the load average, and whether the variant chose the same tokens as the first one of its dtype.
The end-to-end comparison with transformers is bench/decode.py.
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

from bench.random_models import SIZES, random_model_pair  # noqa: E402

VARIANTS = ("plain", "cpu", "cpu-xla", "cpu-bf16", "cpu-bf16-xla", "cpu-bf16-array-pool", "cpu-xla-masks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="87m-8k,87m", help=f"comma-separated model sizes from {sorted(SIZES)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--variants", default="cpu,cpu-bf16,cpu-bf16-array-pool", help=f"comma-separated, from {VARIANTS}")
    p.add_argument("--rounds", type=int, default=20, help="alternating rounds of 5 steps per variant")
    p.add_argument("--temperature", type=float, default=0.0, help="every row samples at this temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    return p.parse_args(argv)


def step_without_native_filter():
    """`engine_step` compiled on its own with the native top-k/top-p filter reported unavailable while it traces
    (so its sampled rows use XLA's masks); the native matmul, attention and argmax stay."""
    import functools
    import inspect

    import jax

    from kernels import cpu_native
    from phi4_jax.inference import batching

    original = batching.engine_step.__wrapped__

    def traced_again(*args, **kwargs):   # a new function: jit's trace cache would hand back engine_step's program
        return original(*args, **kwargs)

    traced_again.__signature__ = inspect.signature(original)
    fn = jax.jit(traced_again, static_argnames=("config", "top_k", "shard"), donate_argnames=("pages",))
    available = cpu_native.available

    @functools.wraps(fn)
    def step(*args, **kwargs):
        cpu_native.available = lambda target=None: target != "phi4_cpu_sampling_filter" and available(target)
        try:
            return fn(*args, **kwargs)
        finally:
            cpu_native.available = available
    return step


def plain_layout(params, config):
    """The engine's per-layer CPU layout before `cpu_weights`: per-layer arrays, q/k/v and gate/up fused."""
    import jax

    from phi4_jax.model.decoder import fuse_projections

    layers = [fuse_projections(jax.tree.map(lambda w, i=i: w[i], params["layers"])) for i in range(config.num_layers)]
    return dict(params, layers=layers)


def array_pool(pages):
    """A `PageBits` pool (`init_pages_per_layer`, 16-bit) as plain arrays of its float dtype (the pool before
    `PageBits`; `paged_extend_per_layer` reads and writes either)."""
    import jax

    from phi4_jax.inference.paged_cache import PagedKV
    from phi4_jax.inference.paged_layers import float_pages

    return PagedKV(*(tuple(jax.jit(float_pages)(p) for p in side) for side in (pages.k, pages.v)))


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from phi4_jax.inference.batching import ContinuousBatchingEngine, engine_step
    from phi4_jax.inference.paged_layers import per_layer_params
    from phi4_jax.model.decoder import model_from_params

    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    print("| model | batch | variant | wall median ms | wall p10 ms | CPU median ms | load (1 min) | same tokens |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for size in args.sizes.split(","):
        dtypes = sorted({"bfloat16" if "bf16" in v else "float32" for v in variants})
        models = {}
        for dtype in dtypes:
            _, params, config = random_model_pair(size, dtype)
            models[dtype] = model_from_params(config, params)
        for batch in [int(b) for b in args.batches.split(",")]:
            engines = {dtype: ContinuousBatchingEngine(model, max_batch=batch, max_context=384, prefill_chunk=128)
                       for dtype, model in models.items()}
            runs = {}   # variant: [engine, params, pages]
            for name in variants:
                engine = engines["bfloat16" if "bf16" in name else "float32"]
                params = models["bfloat16" if "bf16" in name else "float32"].params
                if name == "plain":
                    step_params = jax.jit(plain_layout, static_argnums=1)(params, engine.config)
                elif name.endswith("-xla"):
                    step_params = per_layer_params(params, native=False)
                else:
                    step_params = engine.step_params
                pages = array_pool(engine.pages) if name.endswith("array-pool") else jax.tree.map(
                    lambda a: a.copy(), engine.pages)
                runs[name] = [engine, step_params, pages]
            engine = next(iter(engines.values()))
            width = engine._width(300)
            tables = np.arange(1, 1 + batch * width, dtype=np.int32).reshape(batch, width)
            inputs = jax.device_put(dict(
                tokens=np.full((batch, 1), 5, np.int32), feed=np.full(batch, -1, np.int32),
                prev_decode=np.zeros(batch, np.int32), prev_prefill=np.zeros(1, np.int32),
                start=np.full(batch, 250, np.int32), n_new=np.ones(batch, np.int32), block_tables=tables,
                keys=np.zeros((batch,) + tuple(jax.random.key_data(jax.random.key(0)).shape), np.uint32),
                steps=np.zeros(batch, np.int32), temperature=np.full(batch, args.temperature, np.float32),
                sample_top_k=np.full(batch, args.top_k, np.int32), top_p=np.full(batch, args.top_p, np.float32),
                want_logprobs=np.bool_(False)))

            masks_step = step_without_native_filter() if "cpu-xla-masks" in runs else None

            def step(name):
                run = runs[name]
                fn = masks_step if name == "cpu-xla-masks" else engine_step
                run[2], token, *_ = fn(run[1], run[2], **inputs, config=run[0].config, top_k=run[0].top_k, shard=None)
                return jax.block_until_ready(token)

            tokens = {name: np.asarray([step(name) for _ in range(3)][-1]) for name in runs}   # compile + warm
            wall = {name: [] for name in runs}
            cpu = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name in runs:
                    for _ in range(5):
                        c, s = time.process_time(), time.perf_counter()
                        step(name)
                        wall[name].append(time.perf_counter() - s)
                        cpu[name].append(time.process_time() - c)
            first = {}
            for name in runs:
                first.setdefault(runs[name][0].config.compute_dtype, name)
            for name in runs:
                same = bool((tokens[name] == tokens[first[runs[name][0].config.compute_dtype]]).all())
                print(f"| {size} | {batch} | {name} | {statistics.median(wall[name]) * 1e3:.2f} "
                      f"| {np.percentile(wall[name], 10) * 1e3:.2f} | {statistics.median(cpu[name]) * 1e3:.2f} "
                      f"| {os.getloadavg()[0]:.1f} | {same} |", flush=True)
            for engine in engines.values():
                engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
