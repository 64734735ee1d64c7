"""Quantized phi-4 14B with a 16K cache on one 16 GB TPU v5e chip, as the real TPU compiler plans it (no TPU needed).

    python bench/quant_tpu_memory.py                              # int4, v5e, decode step and 16K prefill
    python bench/quant_tpu_memory.py --write BENCHMARKS.md        # also the "Quantized inference" section

The libtpu wheel (the `tpu-aot` extra) compiles for `--topology`'s first chip (`jax.experimental.topologies`):
the parameters are `abstract_quantized_params` (load_model's defaults for `--quantize`), the cache and tokens
abstract, attention the XLA path; `memory_analysis()` gives the arguments (weights + cache) and the temporaries
XLA plans, against the chip's HBM. (On a machine where another process holds libtpu, set
ALLOW_MULTIPLE_LIBTPU_LOAD=1.)
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import gib, publish, run_heading  # noqa: E402

V5E_HBM = int(15.75 * 2**30)  # what the compiler reports as available on a v5e chip (16 GB)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phi4-14b")
    p.add_argument("--quantize", default="int4", choices=["int8", "int4"])
    p.add_argument("--topology", default="v5e:2x2", help="a TPU topology; its first chip is used")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from phi4_jax.inference import kv_cache as generation
    from phi4_jax.model.config import get_preset
    from phi4_jax.quant.weights import QuantizeOptions, abstract_quantized_params

    device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
    on = jax.sharding.SingleDeviceSharding(device)
    place = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), tree)  # noqa
    config = get_preset(args.model, param_dtype="bfloat16", compute_dtype="bfloat16", remat_policy="none",
                        attention_impl="xla")
    params = place(abstract_quantized_params(config, QuantizeOptions(args.quantize), "bfloat16"))
    cache = place(jax.eval_shape(lambda: generation.init_cache(config, 1, args.context)))
    token = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=on)
    tokens = jax.ShapeDtypeStruct((1, args.context), jnp.int32, sharding=on)
    rows = []
    for name, lowered in (
            ("decode step (full cache, donated)", jax.jit(generation.decode_step, static_argnums=(3,),
                                                          donate_argnums=(1,)).lower(params, cache, token, config)),
            (f"prefill ({args.context}-token prompt)", jax.jit(generation.prefill, static_argnums=(3, 4)).lower(
                params, tokens, token, config, args.context))):
        ma = lowered.compile().memory_analysis()
        total = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
        rows.append((name, ma.argument_size_in_bytes, ma.output_size_in_bytes - ma.alias_size_in_bytes,
                     ma.temp_size_in_bytes, total))
        print(rows[-1], flush=True)
    lines = [run_heading(__file__, argv), "",
             f"TPU compiler (libtpu, jax {jax.__version__}) for one chip of {args.topology} ({device.device_kind}), "
             f"{args.model} {args.quantize} (load_model's defaults), bf16 scales and cache, {args.context}-token "
             f"cache, XLA attention. The chip has {gib(V5E_HBM)} of HBM.", "",
             "| program | arguments (weights, cache, tokens) | new outputs | temporaries | total | fits |",
             "|---|---:|---:|---:|---:|---|"]
    for name, arg, out, temp, total in rows:
        lines.append(f"| {name} | {gib(arg)} | {gib(out)} | {gib(temp)} | **{gib(total)}** "
                     f"| {'yes' if total <= V5E_HBM else 'no'} |")
    publish(lines, args.write, "Quantized inference", "quant-tpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
