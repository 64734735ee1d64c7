"""Does bf16 phi-4 (14B) plus a 16K-token KV cache fit one 80 GB H100? The arithmetic, from abstract shapes.

    python bench/inference_memory.py                        # print the table
    python bench/inference_memory.py --write BENCHMARKS.md  # also replace the "Inference memory" section
    python bench/inference_memory.py --quantize int4 --budget-gb 16 --write BENCHMARKS.md
        # int4 weights (groups of 128, int8 embedding rows) against a 16 GB card: the "Quantized inference" section

Nothing is allocated: parameter and cache sizes come from `jax.eval_shape`, and the prefill (a 16K-token
prompt) and the decode step (against a full 16K cache) are compiled ahead of time for the local backend
on abstract inputs, whose `memory_analysis()` gives the temporary buffers XLA plans for them.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

H100_BYTES = 80 * 10**9  # the H100's 80 GB


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB ({n / 2**30:.2f} GiB)"


def _abstract_params(config, quantize):
    from phi4_jax.model.decoder import abstract_model
    from phi4_jax.quant.weights import QuantizeOptions, abstract_quantized_params

    if quantize is None:
        return abstract_model(config).params
    return abstract_quantized_params(config, QuantizeOptions(quantize), config.param_dtype)


def _temporaries(config, batch: int, context: int, quantize=None) -> tuple[int, int]:
    """XLA's planned temporary bytes of (prefill of a full-context prompt, one decode step on a full cache)."""
    import jax
    import jax.numpy as jnp

    from phi4_jax.inference import kv_cache as generation

    params = _abstract_params(config, quantize)
    cache = jax.eval_shape(lambda: generation.init_cache(config, batch, context))
    tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    prefill = jax.jit(generation.prefill, static_argnums=(3, 4)).lower(params, tokens, lengths, config, context)
    decode = jax.jit(generation.decode_step, static_argnums=(3,), donate_argnums=(1,)).lower(
        params, cache, jax.ShapeDtypeStruct((batch,), jnp.int32), config)
    return (prefill.compile().memory_analysis().temp_size_in_bytes,
            decode.compile().memory_analysis().temp_size_in_bytes)


def measure(preset: str, context: int, batch: int, dtype: str, quantize: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    from phi4_jax.inference import kv_cache as generation
    from phi4_jax.model.config import get_preset

    config = get_preset(preset, param_dtype=dtype, compute_dtype=dtype, remat_policy="none")
    params = _abstract_params(config, quantize)   # ShapeDtypeStructs; nothing allocated
    param_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    cache = jax.eval_shape(lambda: generation.init_cache(config, batch, context))
    cache_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in (cache.k, cache.v))  # + 4 bytes/sequence
    assert cache_bytes == generation.cache_bytes(config, batch, context)
    prefill_temp, decode_temp = _temporaries(config, batch, context, quantize)
    result = {"config": config, "param_bytes": param_bytes, "cache_bytes": cache_bytes,
              "prefill_temp": prefill_temp, "decode_temp": decode_temp, "backend": jax.default_backend(),
              "native_temps": None}
    if jax.default_backend() == "cpu" and dtype != "float32":
        # XLA:CPU has no native bf16 matmul: it converts the bf16 operands, i.e. all weights, to f32 (a CPU-only
        # copy that a GPU/TPU never makes). The float32 program has the same buffers without that copy, each
        # at least as large as its bf16 counterpart, so its temporaries bound the bf16 ones from above.
        result["native_temps"] = (prefill_temp, decode_temp)
        result["prefill_temp"], result["decode_temp"] = _temporaries(
            config.replace(param_dtype="float32", compute_dtype="float32"), batch, context, quantize)
    return result


def report(m: dict, context: int, batch: int, dtype: str) -> str:
    c = m["config"]
    itemsize = 2 if dtype in ("bfloat16", "float16") else 4
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * itemsize
    peak_prefill = m["param_bytes"] + m["cache_bytes"] + m["prefill_temp"]
    peak_decode = m["param_bytes"] + m["cache_bytes"] + m["decode_temp"]
    peak = max(peak_prefill, peak_decode)
    cmd = "python bench/inference_memory.py" + (f" --context {context}" if context != 16384 else "") + \
        (f" --batch {batch}" if batch != 1 else "")
    return "\n".join([
        f"`{cmd}` (shapes from `jax.eval_shape`; prefill and decode step compiled ahead of time for the "
        f"{m['backend']} backend on abstract inputs, temporaries from XLA's `memory_analysis()`).",
        "",
        f"- Parameters: {c.num_params:,} x {itemsize} bytes ({dtype}) = **{gb(m['param_bytes'])}**.",
        f"- KV cache per token: 2 (k, v) x {c.num_layers} layers x {c.num_kv_heads} kv heads x {c.head_dim} "
        f"x {itemsize} bytes = {per_token:,} bytes (GQA: 4x less than caching all {c.num_heads} query heads).",
        f"- KV cache for batch {batch} x {context} tokens: {per_token:,} x {batch * context:,} = "
        f"**{gb(m['cache_bytes'])}**.",
        f"- Prefill of a {context}-token prompt: temporaries at most {gb(m['prefill_temp'])} (blockwise attention; logits "
        "only at the last token).",
        f"- Decode step against the full cache (cache donated, updated in place): temporaries at most "
        f"{gb(m['decode_temp'])}.",
        *([] if m["native_temps"] is None else [
            "",
            f"On the CPU backend the {dtype} program plans {gb(m['native_temps'][0])} (prefill) and "
            f"{gb(m['native_temps'][1])} (decode) of temporaries, because XLA:CPU converts every bf16 matmul "
            "operand, i.e. all weights, to float32; GPUs and TPUs multiply bf16 natively. The temporaries above "
            "are the float32 program's, an upper bound for the bf16 ones (same buffers, twice the itemsize)."]),
        "",
        "| | bytes |",
        "|---|---:|",
        f"| parameters | {gb(m['param_bytes'])} |",
        f"| KV cache | {gb(m['cache_bytes'])} |",
        f"| peak during prefill (params + cache + temporaries) | {gb(peak_prefill)} |",
        f"| peak during decode (params + cache + temporaries) | {gb(peak_decode)} |",
        f"| **one H100 (80 GB)** | {gb(H100_BYTES)}: **{'fits' if peak < H100_BYTES else 'does NOT fit'}**, "
        f"{gb(H100_BYTES - peak)} to spare |",
        "",
        f"JAX on a GPU preallocates 75% of its memory by default ({gb(int(0.75 * H100_BYTES))} on an H100): "
        f"{'enough' if peak < 0.75 * H100_BYTES else 'not enough; raise XLA_PYTHON_CLIENT_MEM_FRACTION'} "
        "for this peak.",
    ])


def quantized_report(m: dict, context: int, batch: int, dtype: str, quantize: str, budget_gb: float) -> str:
    """The memory of the quantized model, against a `budget_gb` card (the "Quantized inference" section)."""
    c = m["config"]
    budget = int(budget_gb * 10**9)
    peak_prefill = m["param_bytes"] + m["cache_bytes"] + m["prefill_temp"]
    peak_decode = m["param_bytes"] + m["cache_bytes"] + m["decode_temp"]
    peak = max(peak_prefill, peak_decode)
    cmd = f"python bench/inference_memory.py --quantize {quantize} --budget-gb {budget_gb:g}" + \
        (f" --context {context}" if context != 16384 else "") + (f" --batch {batch}" if batch != 1 else "")
    lines = [
        f"`{cmd}` ({dtype} scales, norms and KV cache; `load_model(..., quantize={quantize!r})`'s defaults: "
        f"{'int8 per output channel' if quantize == 'int8' else 'int4 in groups of 128, two per byte'} for the "
        "layers and lm_head, int8 rows for the embedding). The parameter tree is `abstract_quantized_params` "
        "(ShapeDtypeStructs); the prefill and decode step with those weights are compiled ahead of time for the "
        f"{m['backend']} backend, temporaries from `memory_analysis()`"
        + (" (of the float32-compute program, an upper bound: XLA:CPU has no bf16 matmul)." if m["native_temps"]
           else "."),
        "",
        "| | bytes |",
        "|---|---:|",
        f"| parameters ({c.num_params:,}, {quantize}) | {gb(m['param_bytes'])} |",
        f"| KV cache, batch {batch} x {context} tokens | {gb(m['cache_bytes'])} |",
        f"| prefill temporaries ({context}-token prompt) | {gb(m['prefill_temp'])} |",
        f"| decode-step temporaries (full cache) | {gb(m['decode_temp'])} |",
        f"| peak during prefill | {gb(peak_prefill)} |",
        f"| peak during decode | {gb(peak_decode)} |",
        f"| **a {budget_gb:g} GB card** | **{'fits' if peak < budget else 'does NOT fit'}**, "
        f"{gb(budget - peak)} to spare |",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phi4-14b")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantized parameters (load_model's defaults for that mode)")
    p.add_argument("--budget-gb", type=float, default=16.0, help="card size the quantized model is checked against")
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    args = p.parse_args(argv)
    m = measure(args.model, args.context, args.batch, args.dtype, args.quantize)
    if args.quantize:
        text = quantized_report(m, args.context, args.batch, args.dtype, args.quantize, args.budget_gb)
        print(text)
        if args.write:
            from bench._report import update_section

            update_section(args.write, "Quantized inference", f"quant-memory-{args.quantize}", replace=text)
            print(f"wrote the 'Quantized inference' memory block of {args.write}")
        return 0
    text = report(m, args.context, args.batch, args.dtype)
    print(text)
    if args.write:
        from bench._report import update_section

        update_section(args.write, "Inference memory", "inference-memory", replace=text)
        print(f"wrote the 'Inference memory' section of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
