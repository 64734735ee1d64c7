"""The real TPU compiler on a CPU machine: sharded train step, decode step and a Pallas kernel in shard_map.

`libtpu` (the `tpu-aot` extra: `pip install -e '.[tpu-aot]'`) gives compile-only devices for a TPU topology
(`phi4_jax.train.plan.tpu_topology_devices`); `jit(f).lower(...).compile()` on arrays sharded over them runs the
TPU compiler (XLA:TPU, Mosaic for Pallas kernels) and its `memory_analysis()`. Without libtpu the tests that
need it skip.

The expected sizes are computed by hand from the shapes, dtypes and the mesh axes each parameter is split over
(not from the project's sharding code), and the compiler's argument/alias bytes must match them.
"""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
from phi4_jax.model import sharding
from phi4_jax.model.config import get_preset
from phi4_jax.model.decoder import flat_param_specs, logical_axes_tree
from phi4_jax.train.plan import (
    DoesNotFitError,
    MemoryPlan,
    PlanError,
    choose_attention,
    compile_for,
    tpu_topology_devices,
    train_step_program,
)

TOPOLOGY = "v5p:2x2x2"        # 8 chips (one device each: v5p's two TensorCores act as one)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny, but TPU-shaped: head_dim 128 (the Mosaic kernels' lane width), bf16 compute, fp32 master weights.
TPU_TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=128, compute_dtype="bfloat16", remat_policy="full")
SEQ, BATCH = 512, 8


@pytest.fixture(scope="module")
def tpu_devices():
    pytest.importorskip("libtpu", reason="needs the libtpu wheel (pip install -e '.[tpu-aot]') for the TPU compiler")
    devices = tpu_topology_devices(TOPOLOGY)
    assert len(devices) == 8 and {d.platform for d in devices} == {"tpu"}
    return devices


def _param_shard_bytes(config, mesh_axis_sizes, axis_of, dtype_bytes):
    """Per-device bytes of the parameters when logical axis name -> mesh axis per `axis_of` (by hand)."""
    total = 0
    for shape, axes in flat_param_specs(config).values():
        div = math.prod(mesh_axis_sizes[axis_of[a]] for a in axes if a in axis_of)
        total += math.prod(shape) // div * dtype_bytes
    return total


# ----------------------------------------------------------------------------- the train step

@pytest.fixture(scope="module")
def train_plan(tpu_devices):
    config = get_preset("tiny", **TPU_TINY, attention_impl="xla")
    mesh = sharding.build_mesh("fsdp=8", devices=tpu_devices)
    step, state, batch = train_step_program(config, mesh, global_batch=BATCH, seq_len=SEQ, loss_chunk=256)
    compiled = compile_for(mesh, step, state, batch, attention="xla")
    return config, compiled, MemoryPlan.of(compiled)


def test_train_step_compiles_for_tpu_with_consistent_memory(train_plan):
    config, compiled, mem = train_plan
    # by hand: every parameter with an "embed" axis is split 8 ways over fsdp, the others are whole;
    # the train state holds fp32 params + Adam mu + nu (3 x 4 bytes), the batch 3 int32 [8, 512] arrays / 8.
    params = _param_shard_bytes(config, {"fsdp": 8}, {"embed": "fsdp"}, 4)
    batch = 3 * BATCH * SEQ * 4 // 8
    scalars = 4096    # step and the optimizer's counters: a few scalars, each padded to 512 bytes on TPU
    assert 3 * params + batch <= mem.arguments <= 3 * params + batch + scalars, (mem, params)
    # the whole state is donated: aliased = the state, outputs = new state + 4 metrics
    assert 3 * params <= mem.aliased <= mem.arguments - batch
    assert mem.aliased <= mem.outputs <= mem.aliased + scalars
    assert mem.temporaries > 0 and mem.peak == mem.arguments + mem.outputs - mem.aliased + mem.temporaries


def test_train_step_with_pallas_tpu_attention_compiles(tpu_devices):
    """The sharded train step with the Pallas TPU kernels (in kernels.sharded's shard_map wrappers) compiles with
    Mosaic inside it."""
    config = get_preset("tiny", **TPU_TINY, attention_impl="pallas_tpu")
    mesh = sharding.build_mesh("fsdp=8", devices=tpu_devices)
    step, state, batch = train_step_program(config, mesh, global_batch=BATCH, seq_len=SEQ, loss_chunk=256)
    compiled = compile_for(mesh, step, state, batch, attention="pallas_tpu")
    assert "tpu_custom_call" in compiled.as_text()


def test_attention_default_is_the_tpu_runs_not_the_hosts(tpu_devices):
    device = tpu_devices[0]
    assert choose_attention(device) == kernels.default_implementation(device=device)
    assert choose_attention(device, "pallas_tpu") == "pallas_tpu"
    with pytest.raises(PlanError, match="'pallas_gpu' cannot run on tpu devices"):
        choose_attention(device, "pallas_gpu")


# ----------------------------------------------------------------------------- generation: prefill and decode

def test_engine_steps_compile_for_tpu(tpu_devices):
    """The engine's jitted step (`batching.engine_step`, the one decode path of `generate`, chat and the server): a
    decode step over 8 slots and a 128-token prefill chunk, params and page pool sharded over a data x tensor mesh
    (serving layout: heads split over `tensor`, the batch replicated)."""
    from phi4_jax.inference import batching, engine
    from phi4_jax.inference.paged_cache import PAGE_AXES, PagedKV

    config = get_preset("tiny", **TPU_TINY, param_dtype="bfloat16", attention_impl="xla")
    mesh = Mesh(np.asarray(tpu_devices).reshape(4, 2), ("data", "tensor"))
    rules = batching.serving_rules({"q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"})
    shard = engine.MeshRules(mesh, engine.hashable_rules(rules))
    b, chunk, context, page = 8, 128, 1024, 16
    num_pages, width = b * context // page + 1, context // page

    def sds(shape, dtype, spec=P()):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    params = jax.tree.map(lambda s, axes: sds(s.shape, s.dtype, sharding.logical_to_spec(axes, rules)),
                          _abstract_params(config), logical_axes_tree(config))
    page_shape = (config.num_layers, num_pages, page, config.num_kv_heads, config.head_dim)
    page_spec = sharding.logical_to_spec(PAGE_AXES, rules)
    pages = PagedKV(sds(page_shape, jnp.bfloat16, page_spec), sds(page_shape, jnp.bfloat16, page_spec))

    def step(rows, t):
        per_row = lambda dtype: sds((rows,), dtype)  # noqa: E731
        return batching.engine_step.lower(
            params, pages, sds((rows, t), jnp.int32), per_row(jnp.int32), sds((b,), jnp.int32), sds((1,), jnp.int32),
            per_row(jnp.int32), per_row(jnp.int32), sds((rows, width), jnp.int32), sds((rows, 2), jnp.uint32), per_row(jnp.int32), per_row(jnp.float32),
            per_row(jnp.int32), per_row(jnp.float32), sds((), jnp.bool_), config=config, top_k=20,
            shard=shard).compile()

    decode, prefill = step(b, 1), step(1, chunk)

    # by hand: bf16 params, head / mlp / vocab axes split over tensor (2); the pages split over kv heads (2):
    # 2 (k, v) x layers x pages x page rows x kv_heads x head_dim x 2 bytes / 2
    param_bytes = _param_shard_bytes(config, {"tensor": 2},
                                     {"q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}, 2)
    page_bytes = 2 * math.prod(page_shape) * 2 // 2
    small = 32768     # tokens, fed tokens, positions, block tables, keys, sampling settings: 14 small arrays, tile-padded
    for plan in (MemoryPlan.of(decode), MemoryPlan.of(prefill)):
        assert param_bytes + page_bytes <= plan.arguments <= param_bytes + page_bytes + small, (plan, param_bytes)
        assert page_bytes <= plan.aliased <= page_bytes + small       # the donated pages are updated in place
        assert plan.temporaries > 0


def _abstract_params(config):
    from phi4_jax.model.decoder import is_param_spec, param_specs

    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], jnp.bfloat16), param_specs(config), is_leaf=is_param_spec)


# ----------------------------------------------------------------------------- a Pallas TPU kernel in shard_map

def test_pallas_tpu_attention_in_shard_map_compiles(tpu_devices):
    """`kernels.flash_attention(implementation="pallas_tpu")` (forward and backward, fused RoPE, segment ids) on
    per-device shards inside `jax.shard_map` over a batch axis of 8 devices: Mosaic compiles the kernels inside the
    sharded program."""
    mesh = Mesh(np.asarray(tpu_devices), ("batch",))
    b, s, hq, hkv, d = 8, 512, 4, 2, 128
    row = NamedSharding(mesh, P("batch"))
    q = jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16, sharding=row)
    kv = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16, sharding=row)
    ids = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=row)

    def per_shard(q, k, v, seg, pos):
        return kernels.flash_attention_rope(q, k, v, pos, theta=10000.0, segment_ids=seg, implementation="pallas_tpu")

    # check_vma=False: the kernels' pallas_call out_shapes carry no varying-mesh-axes type (vma), which
    # shard_map's default check requires of every output inside it.
    attention = jax.shard_map(per_shard, mesh=mesh, in_specs=(P("batch"),) * 5, out_specs=P("batch"),
                              check_vma=False)

    def loss(q, k, v, seg, pos):
        return jnp.sum(attention(q, k, v, seg, pos).astype(jnp.float32))

    compiled = compile_for(mesh, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), q, kv, kv, ids, ids,
                           attention="pallas_tpu")
    hlo = compiled.as_text()
    assert hlo.count("tpu_custom_call") >= 3, "expected the forward, dq and dk/dv Mosaic kernels"
    mem = MemoryPlan.of(compiled)
    # by hand: each device holds one sequence of q (bf16), k, v, and two int32 rows
    assert mem.arguments == (s * hq * d * 2 + 2 * s * hkv * d * 2 + 2 * s * 4)
    assert mem.outputs >= s * hq * d * 2 + 2 * s * hkv * d * 2     # dq, dk, dv shards (+ the loss)


def test_context_parallel_pallas_tpu_attention_compiles(tpu_devices):
    """The Pallas TPU kernel with a query offset as the per-shard attention of context parallelism: the sequence
    split over a context axis of 2 (batch over 4), K/V all-gathered, each shard's queries at q_start =
    axis_index x 512 (a traced scalar, prefetched into SMEM), 2 kv blocks of 512 so shard 0 skips one; forward and
    backward, segment ids, RoPE before the gather. Mosaic compiles the offset kernels inside the sharded program."""
    mesh = Mesh(np.asarray(tpu_devices).reshape(4, 2), ("batch", "context"))
    b, s, hq, hkv, d = 4, 1024, 4, 2, 128
    tok = NamedSharding(mesh, P("batch", "context"))
    q = jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16, sharding=tok)
    kv = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16, sharding=tok)
    ids = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=tok)

    def loss(q, k, v, seg, pos):
        out = kernels.sharded_flash_attention(q, k, v, mesh=mesh, batch_axes="batch", seq_axes="context",
                                              segment_ids=seg, positions=pos, rope_theta=10000.0,
                                              implementation="pallas_tpu")
        return jnp.sum(out.astype(jnp.float32))

    compiled = compile_for(mesh, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), q, kv, kv, ids, ids,
                           attention="pallas_tpu")
    hlo = compiled.as_text()
    for name in ("flash_attention_tpu_fwd", "flash_attention_tpu_dq", "flash_attention_tpu_dkv"):
        assert name in hlo, f"the Mosaic kernel {name} is not in the compiled program"
    assert "all-gather" in hlo, "K/V are not all-gathered over the context axis"


@pytest.mark.parametrize("attention_impl", [None, "pallas_tpu"])
def test_decode_step_with_the_tpu_default_decode_kernel_compiles(tpu_devices, attention_impl):
    """A sharded decode step whose decode attention is the Pallas kernel (the TPU default of
    `kernels.decode_attention` for attention_impl None; asked for by "pallas_tpu") compiles: the kernel sits in
    `kernels.sharded_decode_attention`'s shard_map, batch over `data`, kv heads over `tensor`."""
    from phi4_jax.inference import kv_cache

    config = get_preset("tiny", **TPU_TINY, param_dtype="bfloat16", attention_impl=attention_impl)
    mesh = Mesh(np.asarray(tpu_devices).reshape(4, 2), ("data", "tensor"))
    rules = {"batch": "data", "kv_heads": "tensor", "q_heads": "tensor", "mlp": "tensor"}
    cache_sh = NamedSharding(mesh, sharding.logical_to_spec(kv_cache.CACHE_AXES, rules))
    shape = (config.num_layers, 8, 1024, config.num_kv_heads, config.head_dim)
    cache = kv_cache.KVCache(jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=cache_sh),
                             jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=cache_sh),
                             jax.ShapeDtypeStruct((8,), jnp.int32, sharding=NamedSharding(mesh, P("data"))))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())),
                          _abstract_params(config))

    def step(params, cache, tokens):
        with sharding.activation_sharding(mesh, rules):
            return kv_cache.decode_step(params, cache, tokens, config)

    compiled = compile_for(mesh, jax.jit(step), params, cache, cache.lengths, attention="pallas decode")
    assert "tpu_custom_call" in compiled.as_text()


def test_engine_step_with_the_sharded_pallas_paged_kernel_compiles_for_phi4(tpu_devices):
    """The serving engine's step (`batching.engine_step`: `paged_extend` and sampling) for phi-4 14B in bf16, decoding
    8 sequences against a 16K-token page pool, on an fsdp=4 x tensor=2 v5p mesh laid out by `serving_rules`, with
    attention_impl "pallas_tpu": the Mosaic paged kernel runs inside `kernels.sharded_paged_attention`'s shard_map
    on each device's 5 of phi-4's 10 kv heads. Memory by hand: bf16 params split over fsdp (embed) and tensor
    (heads, mlp, vocab); the pool split over kv heads only, donated and updated in place, and never copied inside
    the layer loop (bench/paged_tpu_compile.py)."""
    import functools
    import re

    from bench.paged_tpu_compile import pool_copies_in_layer_loop
    from phi4_jax.inference import batching, paged_cache
    from phi4_jax.inference.engine import MeshRules, hashable_rules

    config = get_preset("phi4-14b", param_dtype="bfloat16", compute_dtype="bfloat16", attention_impl="pallas_tpu")
    mesh = sharding.build_mesh("fsdp=4,tensor=2", devices=tpu_devices)
    rules = batching.serving_rules()

    def sds(shape, dtype, spec=P()):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    params = jax.tree.map(lambda s, axes: sds(s.shape, s.dtype, sharding.logical_to_spec(axes, rules)),
                          _abstract_params(config), logical_axes_tree(config))
    b, page, num_pages, width = 8, 16, 1025, 1024                       # 1024 pages of 16 tokens + the null page
    pool_shape = (config.num_layers, num_pages, page, config.num_kv_heads, config.head_dim)
    pool = sds(pool_shape, jnp.bfloat16, sharding.logical_to_spec(paged_cache.PAGE_AXES, rules))
    i32, f32 = (lambda *s: sds(s, jnp.int32)), (lambda *s: sds(s, jnp.float32))
    args = (params, paged_cache.PagedKV(pool, pool), i32(b, 1), i32(b), i32(b), i32(1),   # tokens, feed, fed tokens
            i32(b), i32(b), i32(b, width), sds((b, 2), jnp.uint32), i32(b), f32(b), i32(b), f32(b),
            sds((), jnp.bool_))                                  # start, n_new, tables, keys, steps, T, top-k, top-p
    step = functools.partial(batching.engine_step, config=config, top_k=batching.MAX_TOP_LOGPROBS,
                             shard=MeshRules(mesh, hashable_rules(rules)))
    compiled = compile_for(mesh, jax.jit(step, donate_argnums=(1,)), *args, attention="pallas_tpu paged")
    hlo = compiled.as_text()
    # the kernel's per-device output: 8 sequences x 5 kv heads x 8 (4 q heads x 1 token, padded) rows x 128
    assert re.search(r"bf16\[8,5,8,128\][^\n]*custom-call\([^\n]*tpu_custom_call", hlo)
    # the kernel reads the pool in its own layout: no relayout copy of the pool inside the layer loop
    assert pool_copies_in_layer_loop(hlo, math.prod(pool.sharding.shard_shape(pool_shape))) == 0
    param_bytes = _param_shard_bytes(config, {"fsdp": 4, "tensor": 2}, {"embed": "fsdp", "vocab": "tensor",
                                     "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}, 2)
    pool_bytes = 2 * math.prod(pool_shape) * 2 // 2                     # k and v, bf16, kv heads over tensor
    mem, small = MemoryPlan.of(compiled), 64 * 1024
    assert param_bytes + pool_bytes <= mem.arguments <= param_bytes + pool_bytes + small, (mem, param_bytes)
    assert pool_bytes <= mem.aliased <= pool_bytes + small, mem


def test_a_program_larger_than_hbm_is_a_does_not_fit_error(tpu_devices):
    """The TPU compiler checks its plan against the chip's HBM; that refusal becomes DoesNotFitError."""
    mesh = Mesh(np.asarray(tpu_devices), ("x",))
    x = jax.ShapeDtypeStruct((8 * 524288,), jnp.float32, sharding=NamedSharding(mesh, P("x")))

    def f(x):      # a sorted [524288, 65536] fp32 block per device: 128 GiB, more than v5p's 95 GiB
        return jnp.sort(jnp.outer(x, x[:65536]) * 3.0 + 1.0, axis=1)[:, 7].sum()

    with pytest.raises(DoesNotFitError, match=r"does not fit on TPU v5: the compiler says RESOURCE_EXHAUSTED"):
        compile_for(mesh, jax.jit(f), x)


# ----------------------------------------------------------------------------- the CLI

def test_plan_cli_for_a_tpu_topology(tpu_devices):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "phi4_jax.plan", "--topology", TOPOLOGY, "--model", "tiny",
                          "--mesh", "fsdp=8", "--seq-len", "256", "--global-batch", "8", "--attention", "xla"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "attention=xla" in lines and f"TPU topology {TOPOLOGY}" in out.stdout
    assert "fits in 95 GiB of HBM per v5p chip" in out.stdout
    assert lines[-1].startswith("peak_bytes_per_device=") and int(lines[-1].split("=")[1]) > 0
    bad = subprocess.run([sys.executable, "-m", "phi4_jax.plan", "--topology", "v5p:3x3", "--model", "tiny"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cannot make TPU topology 'v5p:3x3'" in bad.stderr
    assert "Traceback" not in bad.stderr


def _plan_args(**changes):
    import argparse

    args = dict(model="tiny", mesh="fsdp=8", seq_len=256, global_batch=8, micro_batches=1, remat="full",
                loss_chunk=1024, rope_theta=None, attention=None)
    return argparse.Namespace(**{**args, **changes})


def test_plan_compiles_the_attention_it_prints(tpu_devices, capsys):
    """Without --attention the plan prints and compiles the TPU run's default for the model's inputs, not the CPU
    host's."""
    import phi4_jax.train.plan as plan_module

    tiny = get_preset("tiny")
    default = kernels.default_implementation(device=tpu_devices[0], dtype=tiny.compute_dtype, head_dim=tiny.head_dim)
    assert plan_module.plan(_plan_args(), tpu_devices, topology=TOPOLOGY) == 0
    assert f"attention={default}" in capsys.readouterr().out.splitlines()


def test_plan_says_when_the_peak_exceeds_the_chips_hbm(tpu_devices, monkeypatch, capsys):
    """A program the compiler accepts can still need more than the chip's HBM (it checks only temporaries):
    the plan says so and returns 3, with peak_bytes_per_device still last."""
    import phi4_jax.train.plan as plan_module

    monkeypatch.setitem(plan_module.TPU_HBM_GIB, "v5p", 0.001)          # a 1 MiB chip
    assert plan_module.plan(_plan_args(attention="xla"), tpu_devices, topology=TOPOLOGY) == 3
    lines = capsys.readouterr().out.strip().splitlines()
    assert "does NOT fit in 0 GiB of HBM per v5p chip" in lines[-2]
    assert int(lines[-1].removeprefix("peak_bytes_per_device=")) > 2**20


def test_topology_errors_name_the_problem(monkeypatch):
    with pytest.raises(PlanError, match="must look like GENERATION:AxB"):
        tpu_topology_devices("v5p-16")
    import phi4_jax.train.plan as plan_module

    monkeypatch.setattr(plan_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PlanError, match=r"needs the libtpu wheel .*tpu-aot"):
        tpu_topology_devices(TOPOLOGY)
    # a libtpu that is not the one jax's `tpu` extra pins (jax 0.10.2: libtpu==0.0.42.*)
    from importlib import metadata

    version = metadata.version
    monkeypatch.setattr(plan_module.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1" if name == "libtpu" else version(name))
    with pytest.raises(PlanError, match=r"libtpu 0.0.1 does not match jax .*, which needs libtpu=="):
        tpu_topology_devices(TOPOLOGY)
