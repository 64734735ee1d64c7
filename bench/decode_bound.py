"""Decode tokens/s of a 14B Phi-4-shaped bf16 model (random weights) against the memory-bandwidth bound.

    python bench/decode_bound.py --json OUT.json            # on an H100/H200: phi4-14b shapes, batch 1 and 8
    python bench/decode_bound.py --smoke --json OUT.json    # tiny model on CPU, same code path

The step timed is the project's own `phi4_jax.inference.kv_cache.decode_step` (jitted, cache donated), with the
greedy next token fed back on the device, so no host round trip sits between steps. The cache starts
filled with `--context` random keys/values per sequence (no prefill needed, never zeros); then `--warmup`
steps, then `--repeats` runs of `--steps` steps, each run dispatched back to back and synchronized once.
tokens/s = batch * steps / median run time.

Bound: every step must read each weight once (the embedding table only for the `batch` looked-up rows)
and each sequence's valid keys/values (2 * layers * kv_heads * head_dim * bytes per cached token, at the
mean context length of the timed steps). bound tokens/s = batch * copy bandwidth / bytes per step, with
the copy bandwidth measured here first (`bench/roofline.py`: read + write of a random buffer). Weights are
random bf16 N(0, 0.02) made on the device.
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
from tqdm import tqdm  # noqa: E402

from bench._report import write_json  # noqa: E402
from bench.roofline import copy_bandwidth  # noqa: E402
from phi4_jax.inference.kv_cache import KVCache, decode_step  # noqa: E402
from phi4_jax.model.config import get_preset  # noqa: E402
from phi4_jax.model.decoder import is_param_spec, param_specs  # noqa: E402


def random_params(config, seed: int = 0):
    """bf16 parameters N(0, 0.02) (norm weights 1 + N(0, 0.02)), generated on the device by one jitted call."""
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_param_spec)
    dtype = jnp.dtype(config.param_dtype)

    def make(key):
        keys = jax.random.split(key, len(leaves))
        return [((1.0 if axes[-1] == "norm" else 0.0) + 0.02 * jax.random.normal(k, shape, dtype)).astype(dtype)
                for k, (shape, axes) in zip(keys, leaves)]

    t0 = time.perf_counter()
    out = jax.block_until_ready(jax.jit(make)(jax.random.key(seed)))
    print(f"random {config.num_params / 1e9:.2f}B-parameter weights in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return jax.tree.unflatten(treedef, out)


def random_cache(config, batch: int, capacity: int, context: int, seed: int = 1) -> KVCache:
    shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.compute_dtype)
    kk, kv = jax.random.split(jax.random.key(seed))
    make = jax.jit(lambda k: jax.random.normal(k, shape, dtype))
    return KVCache(make(kk), make(kv), jnp.full((batch,), context, jnp.int32))


def bytes_per_step(config, params, batch: int, mean_context: float) -> dict:
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    embed = params["embed"]
    embed_unread = embed.size * embed.dtype.itemsize - batch * embed.shape[1] * embed.dtype.itemsize
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * \
        jnp.dtype(config.compute_dtype).itemsize
    kv = batch * mean_context * kv_per_token
    return {"weight_bytes": weight_bytes, "weight_bytes_read": weight_bytes - embed_unread,
            "kv_bytes_read": kv, "total": weight_bytes - embed_unread + kv}


def bench_batch(config, params, batch: int, args, bandwidth: float) -> dict:
    capacity = args.context + args.warmup + args.repeats * args.steps + 1
    cache = random_cache(config, batch, capacity, args.context)

    def step(params, cache, tokens):
        cache, logits = decode_step(params, cache, tokens, config)
        return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    jstep = jax.jit(step, donate_argnums=(1,))
    tokens = jax.random.randint(jax.random.key(2), (batch,), 0, config.vocab_size, jnp.int32)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        cache, tokens = jstep(params, cache, tokens)
    jax.block_until_ready(tokens)
    warmup_s = time.perf_counter() - t0
    runs = []
    for _ in tqdm(range(args.repeats), desc=f"decode batch {batch}", unit="run"):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            cache, tokens = jstep(params, cache, tokens)
        jax.block_until_ready(tokens)
        runs.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(runs)
    mean_context = args.context + args.warmup + args.repeats * args.steps / 2
    nbytes = bytes_per_step(config, params, batch, mean_context)
    bound_tokens_per_s = batch * bandwidth / nbytes["total"]
    tokens_per_s = batch / step_s
    return {"batch": batch, "context": args.context, "mean_context": mean_context, "capacity": capacity,
            "median_step_s": step_s, "step_times_s": runs, "warmup_s": warmup_s,
            "tokens_per_s": tokens_per_s, "bytes_per_step": nbytes, "bound_tokens_per_s": bound_tokens_per_s,
            "fraction_of_bound": tokens_per_s / bound_tokens_per_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model (CPU)")
    p.add_argument("--model", default="phi4-14b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, default=1024, help="cached tokens per sequence when timing starts")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="buffer size of the bandwidth measurement")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="use this copy bandwidth, do not measure")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.context, args.warmup, args.steps, args.repeats = "tiny", 32, 1, 4, 2
        args.copy_bytes = 8 << 20
    config = get_preset(args.model, param_dtype="bfloat16", compute_dtype="bfloat16")
    copy = None
    if args.bandwidth_gbs:
        bandwidth = args.bandwidth_gbs * 1e9
    else:
        copy = copy_bandwidth(args.copy_bytes)
        bandwidth = copy["bytes_per_s"]
    params = random_params(config)
    rows = [bench_batch(config, params, b, args, bandwidth) for b in args.batches]
    dev = jax.devices()[0]
    result = {"model": args.model, "num_params": config.num_params, "dtype": "bfloat16",
              "device": f"{dev.platform}: {dev.device_kind}", "jax_version": jax.__version__,
              "copy_bandwidth_gbs": bandwidth / 1e9, "copy": copy, "rows": rows, "smoke": args.smoke}
    for r in rows:
        print(f"{args.model} bf16 batch {r['batch']} context {r['context']}: {r['tokens_per_s']:.1f} tokens/s, "
              f"bound {r['bound_tokens_per_s']:.1f} tokens/s ({100 * r['fraction_of_bound']:.1f}% of the "
              f"bound at {bandwidth / 1e9:.0f} GB/s)")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
