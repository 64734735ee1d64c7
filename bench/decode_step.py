"""The serving engine's compiled CPU decode step, weight layout A/B, alternating in one process.

    python bench/decode_step.py --sizes 87m-8k,87m --batches 1,8

For each model and batch, one engine (`ContinuousBatchingEngine`, max_batch = the batch) is built and its decode
step (`engine_step`: every row decoding one token at position ~250 of a 384-token context, greedy) is timed
directly, with no host loop around it, on two weight layouts of the same weights: "plain" (per-layer arrays with
q/k/v and gate/up fused: the engine's CPU layout before `cpu_weights`) and "cpu" (the engine's `per_layer_params`:
`MatrixWeight`s, the lm_head also transposed). The two alternate in rounds, so machine load hits both alike; the
table reports the median and 10th-percentile wall time and the median process CPU time (both threads; less
sensitive to other jobs on the machine than wall time) per step, the load average, and whether both layouts
chose the same tokens. The end-to-end comparison with transformers is bench/decode.py.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="87m-8k,87m", help=f"comma-separated model sizes from {sorted(SIZES)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=20, help="alternating rounds of 5 steps per layout")
    return p.parse_args(argv)


def plain_layout(params, config):
    """The engine's per-layer CPU layout before `cpu_weights`: per-layer arrays, q/k/v and gate/up fused."""
    import jax

    from phi4_jax.model.decoder import fuse_projections

    layers = [fuse_projections(jax.tree.map(lambda w, i=i: w[i], params["layers"])) for i in range(config.num_layers)]
    return dict(params, layers=layers)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from phi4_jax.inference.batching import ContinuousBatchingEngine, engine_step
    from phi4_jax.model.decoder import model_from_params

    print("| model | batch | layout | wall median ms | wall p10 ms | CPU median ms | load (1 min) | same tokens |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for size in args.sizes.split(","):
        _, params, config = random_model_pair(size)
        model = model_from_params(config, params)
        for batch in [int(b) for b in args.batches.split(",")]:
            engine = ContinuousBatchingEngine(model, max_batch=batch, max_context=384, prefill_chunk=128)
            layouts = {"plain": jax.jit(plain_layout, static_argnums=1)(model.params, config),
                       "cpu": engine.step_params}
            width = engine._width(300)
            tables = np.arange(1, 1 + batch * width, dtype=np.int32).reshape(batch, width)
            inputs = jax.device_put(dict(
                tokens=np.full((batch, 1), 5, np.int32), feed=np.full(batch, -1, np.int32),
                prev_decode=np.zeros(batch, np.int32), prev_prefill=np.zeros(1, np.int32),
                start=np.full(batch, 250, np.int32), n_new=np.ones(batch, np.int32), block_tables=tables,
                keys=np.zeros((batch,) + tuple(jax.random.key_data(jax.random.key(0)).shape), np.uint32),
                steps=np.zeros(batch, np.int32), temperature=np.zeros(batch, np.float32),
                sample_top_k=np.zeros(batch, np.int32), top_p=np.ones(batch, np.float32),
                want_logprobs=np.bool_(False)))

            def step(layout):
                engine.pages, token, *_ = engine_step(layouts[layout], engine.pages, **inputs, config=engine.config,
                                                      top_k=engine.top_k, shard=None)
                return jax.block_until_ready(token)

            tokens = {name: np.asarray([step(name) for _ in range(3)][-1]) for name in layouts}   # compile + warm
            wall = {name: [] for name in layouts}
            cpu = {name: [] for name in layouts}
            for _ in range(args.rounds):
                for name in layouts:
                    for _ in range(5):
                        c, s = time.process_time(), time.perf_counter()
                        step(name)
                        wall[name].append(time.perf_counter() - s)
                        cpu[name].append(time.process_time() - c)
            same = bool((tokens["plain"] == tokens["cpu"]).all())
            for name in layouts:
                print(f"| {size} | {batch} | {name} | {statistics.median(wall[name]) * 1e3:.2f} "
                      f"| {np.percentile(wall[name], 10) * 1e3:.2f} | {statistics.median(cpu[name]) * 1e3:.2f} "
                      f"| {os.getloadavg()[0]:.1f} | {same} |", flush=True)
            engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
