"""The serving engine's step for phi-4 14B on a TPU mesh, as the real TPU compiler plans it: the sharded Pallas
paged kernel against the XLA gather reference (the peer), compiled in the same run (no TPU needed).

    python bench/paged_tpu_compile.py                                   # v5p:2x2x2, fsdp=4 x tensor=2
    python bench/paged_tpu_compile.py --write BENCHMARKS.md             # also the "Paged attention" section

The libtpu wheel (the `tpu-aot` extra) gives compile-only devices for `--topology`; `batching.engine_step` (the
engine's `paged_extend` plus sampling) is lowered on abstract bf16 phi-4 parameters and an abstract page pool laid
out by `batching.serving_rules` (pool split over kv heads), decoding `--batch` sequences with block tables for
`--context` tokens. Reported per device: `memory_analysis()` (arguments, the donated pool aliased, temporaries),
compile seconds, the Mosaic kernels in the program, and how many whole-pool copies XLA put inside the layer loop
(each is a read and a write of every layer's pages, per layer, per step). (On a machine where another process holds
libtpu, set ALLOW_MULTIPLE_LIBTPU_LOAD=1.)
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import gib, publish, run_heading  # noqa: E402


def compile_step(attention_impl, devices, args):
    """(compile seconds, compiled) of the engine step for phi-4 with `attention_impl`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from phi4_jax.inference import batching, paged_cache
    from phi4_jax.inference.engine import MeshRules, hashable_rules
    from phi4_jax.model import sharding
    from phi4_jax.model.config import get_preset
    from phi4_jax.model.decoder import is_param_spec, logical_axes_tree, param_specs
    from phi4_jax.train.plan import compile_for

    config = get_preset(args.model, param_dtype="bfloat16", compute_dtype="bfloat16", attention_impl=attention_impl)
    mesh = sharding.build_mesh(args.mesh, devices=devices)
    rules = batching.serving_rules()

    def sds(shape, dtype, spec=P()):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    params = jax.tree.map(lambda s, axes: sds(s[0], jnp.bfloat16, sharding.logical_to_spec(axes, rules)),
                          param_specs(config), logical_axes_tree(config), is_leaf=is_param_spec)
    width = -(-args.context // args.page_size)
    pool = sds((config.num_layers, width + 1, args.page_size, config.num_kv_heads, config.head_dim), jnp.bfloat16,
               sharding.logical_to_spec(paged_cache.PAGE_AXES, rules))
    b = args.batch
    i32, f32 = (lambda *s: sds(s, jnp.int32)), (lambda *s: sds(s, jnp.float32))
    step = functools.partial(batching.engine_step, config=config, top_k=batching.MAX_TOP_LOGPROBS,
                             shard=MeshRules(mesh, hashable_rules(rules)))
    start = time.perf_counter()
    compiled = compile_for(mesh, jax.jit(step, donate_argnums=(1,)), params, paged_cache.PagedKV(pool, pool),
                           i32(b, 1), i32(b), i32(b), i32(1), i32(b), i32(b), i32(b, width),
                           sds((b, 2), jnp.uint32), i32(b), f32(b), i32(b), f32(b), sds((), jnp.bool_),
                           attention=attention_impl)
    return time.perf_counter() - start, compiled, pool


def pool_copies_in_layer_loop(hlo: str, pool_elements: int) -> int:
    """`copy` instructions inside the layer scan's body whose result holds as many elements as one device's pool."""
    count = 0
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(", line)
        if m and "while/body" in line and math.prod(int(x) for x in m.group(1).split(",")) == pool_elements:
            count += 1
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phi4-14b")
    p.add_argument("--topology", default="v5p:2x2x2")
    p.add_argument("--mesh", default="fsdp=4,tensor=2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    args = p.parse_args(argv)

    from phi4_jax.train.plan import MemoryPlan, tpu_topology_devices

    devices = tpu_topology_devices(args.topology)
    import jax

    rows = []
    for impl in ("xla", "pallas_tpu"):
        seconds, compiled, pool = compile_step(impl, devices, args)
        local = pool.sharding.shard_shape(pool.shape)
        hlo = compiled.as_text()
        mem = MemoryPlan.of(compiled)
        rows.append((impl, mem, seconds, hlo.count('custom_call_target="tpu_custom_call"'),
                     pool_copies_in_layer_loop(hlo, math.prod(local)), 2 * math.prod(local) * 2))
        print(rows[-1], flush=True)
    lines = [run_heading(__file__, argv), "",
             f"TPU compiler (libtpu, jax {jax.__version__}) for {args.topology} ({devices[0].device_kind}), mesh "
             f"{args.mesh}, `serving_rules` (pool split over kv heads). {args.model} bf16, the engine's step "
             f"decoding {args.batch} sequences, block tables for {args.context} tokens in {args.page_size}-token "
             f"pages. Per device; the pool (k and v) is {gib(rows[0][5])} per device.", "",
             "| paged attention | arguments | aliased (pool, in place) | temporaries | Mosaic kernels | whole-pool "
             "copies in the layer loop | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for impl, mem, seconds, kernels_, copies, _ in rows:
        name = {"xla": "XLA gather reference", "pallas_tpu": "Pallas TPU kernel in shard_map"}[impl]
        lines.append(f"| {name} | {gib(mem.arguments)} | {gib(mem.aliased)} | {gib(mem.temporaries)} | {kernels_} "
                     f"| {copies} | {seconds:.1f} |")
    publish(lines, args.write, "Paged attention", "paged-attention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
