"""The Mosaic TPU flash attention kernels (forward, dq, dk/dv, fused RoPE) against the pure-JAX references.

Everything runs in the TPU interpreter on CPU (`interpret=True` -> `pltpu.InterpretParams()`), which is slow,
so shapes are small and the blocks are the smallest the kernels accept (128 x 128), so that the cases still
have several q and kv blocks, causal block skipping, and a ragged tail.

Tolerances: float32 kernels against float32 references agree to rounding (observed ~1e-6 on the output and
~1e-5 on the gradients), so fp32 checks use atol = rtol = 1e-4 (outputs) / 2e-4 (gradients). bfloat16 runs are
checked against the float32 reference with atol 3e-2 on the output and 4e-2 on gradients scaled by their
largest magnitude (bf16 keeps ~3 significant digits), and must be no worse than 2x the error of the XLA
reference run in bfloat16.
"""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_mode import interpret_for

import kernels
from kernels import AttentionConfigError, attention_naive
from kernels.flash_attention_tpu import flash_attention_tpu
from kernels.pallas_compat import races_found, tpu_target
from kernels.rope_reference import apply_rope_reference

# Interpret mode on CPU; compiled on a TPU under PHI4_KERNEL_TESTS_ON_DEVICE=1.
INTERPRET = interpret_for("tpu")
from jax.experimental.pallas import tpu as pltpu

BLOCKS = dict(block_q=128, block_k=128)
THETA = 250000.0


def _inputs(seed, b, s, hq, hkv, d, dtype=jnp.float32):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (b, s, hq, d), jnp.float32)
    k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(kv, (b, s, hkv, d), jnp.float32)
    dout = jax.random.normal(kd, (b, s, hq, d), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), dout


def _packed_segments(b, s, seed):
    """Per row: 2-3 documents of random lengths, then padding (0) at the end."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, s), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(8, s - 8), size=3, replace=False))
        seg[row, :cuts[0]] = 1
        seg[row, cuts[0]:cuts[1]] = 2
        seg[row, cuts[1]:cuts[2]] = 3 if row % 2 else 2   # second row: three documents
    return jnp.asarray(seg)


def _positions(segment_ids):
    """Positions restarting at 0 in each document (what packing produces)."""
    seg = np.asarray(segment_ids)
    pos = np.zeros_like(seg)
    for row in range(seg.shape[0]):
        for j in range(1, seg.shape[1]):
            pos[row, j] = 0 if seg[row, j] != seg[row, j - 1] else pos[row, j - 1] + 1
    return jnp.asarray(pos)


def _value_and_grads(fn, q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout.astype(out.dtype))


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


@pytest.mark.parametrize(
    "b,s,hq,hkv,d,causal,packed,mode",
    [
        # GQA 1 (MHA), off the block grid, packed documents + padding, batch 2; through kernels.flash_attention
        # with its default blocks (512/512, shrunk to the length).
        (2, 200, 2, 2, 64, True, True, "dispatch"),
        # GQA 2, on the grid, not causal; on two simulated TensorCores with the race detector, which split the
        # grid points of the axes marked "parallel" between them: a wrong dimension semantic (e.g. the two
        # cores accumulating one kv block's group of q heads into the same dk/dv block; 3 kv blocks x 2 heads
        # make the split cut a group) or a DMA race would be reported.
        (1, 384, 2, 1, 128, False, False, "race_check"),
        (1, 136, 8, 1, 128, True, False, "direct"),   # GQA 8, causal, ragged tail
    ],
)
def test_fp32_forward_and_gradients_match_reference(b, s, hq, hkv, d, causal, packed, mode):
    q, k, v, dout = _inputs(0, b, s, hq, hkv, d)
    seg = _packed_segments(b, s, 1) if packed else None
    interpret = True
    if mode == "race_check":
        interpret = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
        pltpu.reset_tpu_interpret_mode_state()

    def ours(q, k, v):
        if mode == "dispatch":
            return kernels.flash_attention(q, k, v, causal=causal, segment_ids=seg, implementation="pallas_tpu",
                                           interpret=INTERPRET)
        return flash_attention_tpu(q, k, v, causal=causal, segment_ids=seg, interpret=interpret, **BLOCKS)

    def ref(q, k, v):
        return attention_naive(q, k, v, causal=causal, segment_ids=seg)

    out, grads = _value_and_grads(ours, q, k, v, dout)
    if mode == "race_check":
        jax.block_until_ready((out, grads))
        assert races_found() is False
    out_ref, grads_ref = _value_and_grads(ref, q, k, v, dout)
    chex.assert_trees_all_close(out, out_ref, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(grads, grads_ref, atol=2e-4, rtol=2e-4)


def test_bf16_against_fp32_reference():
    b, s, hq, hkv, d = 2, 192, 4, 1, 128
    q, k, v, dout = _inputs(3, b, s, hq, hkv, d)
    seg = _packed_segments(b, s, 4)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]

    def ours(q, k, v):
        return flash_attention_tpu(q, k, v, causal=True, segment_ids=seg, interpret=INTERPRET, **BLOCKS)

    def ref(q, k, v):
        return attention_naive(q, k, v, causal=True, segment_ids=seg)

    out, grads = _f32(_value_and_grads(ours, *bf, dout))
    out_ref, grads_ref = _value_and_grads(ref, q, k, v, dout)
    out_xla, grads_xla = _f32(_value_and_grads(ref, *bf, dout))
    chex.assert_trees_all_close(out, out_ref, atol=3e-2, rtol=0)
    for g, g_ref, g_xla in zip(grads, grads_ref, grads_xla):
        scale = float(jnp.max(jnp.abs(g_ref)))
        chex.assert_trees_all_close(g / scale, g_ref / scale, atol=4e-2, rtol=0)
        err, err_xla = float(jnp.max(jnp.abs(g - g_ref))), float(jnp.max(jnp.abs(g_xla - g_ref)))
        assert err <= 2 * err_xla + 1e-3 * scale, (err, err_xla)
    assert float(jnp.max(jnp.abs(out - out_ref))) <= 2 * float(jnp.max(jnp.abs(out_xla - out_ref))) + 1e-3


def test_fused_rope_equals_rope_then_attention():
    b, s, hq, hkv, d = 2, 160, 4, 2, 128
    q, k, v, dout = _inputs(5, b, s, hq, hkv, d)
    seg = _packed_segments(b, s, 6)
    pos = _positions(seg) + jnp.array([[0], [9000]], jnp.int32)   # large offsets: fp32 angles matter

    def fused(q, k, v):
        return flash_attention_tpu(q, k, v, causal=True, segment_ids=seg, interpret=INTERPRET,
                                   rope=(pos, THETA), **BLOCKS)

    def unfused(q, k, v):
        q, k = apply_rope_reference(q, pos, theta=THETA), apply_rope_reference(k, pos, theta=THETA)
        return attention_naive(q, k, v, causal=True, segment_ids=seg)

    out, grads = _value_and_grads(fused, q, k, v, dout)
    out_ref, grads_ref = _value_and_grads(unfused, q, k, v, dout)
    chex.assert_trees_all_close(out, out_ref, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(grads, grads_ref, atol=2e-4, rtol=2e-4)

    # The public entry point: fused kernel for pallas_tpu, RoPE-then-attention for xla; both agree.
    via_dispatch = kernels.flash_attention_rope(q, k, v, pos, theta=THETA, segment_ids=seg,
                                                implementation="pallas_tpu", interpret=INTERPRET)
    via_xla = kernels.flash_attention_rope(q, k, v, pos, theta=THETA, segment_ids=seg, implementation="xla")
    chex.assert_trees_all_close(via_dispatch, out_ref, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(via_xla, out_ref, atol=1e-4, rtol=1e-4)


def test_pallas_tpu_without_tpu_or_interpret_is_refused():
    x = jnp.zeros((1, 128, 2, 128))
    with pytest.raises(AttentionConfigError, match="needs a TPU backend"):
        kernels.flash_attention(x, x, x, implementation="pallas_tpu")


class JitAndNoJitTest(chex.TestCase):
    """The wrapper pads, transposes and picks blocks in Python; it must behave the same traced or not."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward(self):
        q, k, v, _ = _inputs(8, 1, 72, 2, 1, 64)
        seg = jnp.asarray(np.r_[np.ones(40), 2 * np.ones(24), np.zeros(8)][None].astype(np.int32))
        fn = self.variant(lambda q, k, v, seg: flash_attention_tpu(
            q, k, v, causal=True, segment_ids=seg, interpret=INTERPRET, **BLOCKS))
        chex.assert_trees_all_close(fn(q, k, v, seg), attention_naive(q, k, v, causal=True, segment_ids=seg),
                                    atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,shape,dtype,match",
    [
        ({}, (1, 16, 2, 32), jnp.float32, "head_dim a multiple of 64"),
        ({}, (1, 16, 2, 64), jnp.float16, "float32 and bfloat16"),
        ({"block_k": 64}, (1, 16, 2, 64), jnp.float32, "block_k must be a positive multiple of 128"),
        ({"block_q": 64}, (1, 16, 2, 64), jnp.float32, "block_q must be a positive multiple of 128"),
        ({"rope": "positions"}, (1, 16, 2, 128), jnp.float32, "rope must be a"),
    ],
)
def test_unsupported_configurations_are_refused_clearly(kwargs, shape, dtype, match):
    x = jnp.zeros(shape, dtype)
    with pytest.raises(AttentionConfigError, match=match):
        flash_attention_tpu(x, x, x, interpret=INTERPRET, **kwargs)


def test_fused_rope_needs_full_lane_head_dim():
    x = jnp.zeros((1, 16, 2, 64))
    pos = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(AttentionConfigError, match="multiple of 128"):
        kernels.flash_attention_rope(x, x, x, pos, theta=THETA, implementation="pallas_tpu", interpret=INTERPRET)


def test_kernels_lower_for_a_real_tpu():
    """Lowers forward and backward (segments + fused RoPE, bf16, ragged length) to Mosaic for a TPU from this
    CPU host. This runs Pallas' TPU lowering, including its (8, 128) block-shape rules, but not Mosaic's
    compiler passes in libtpu: those need the hardware runs."""
    q = jax.ShapeDtypeStruct((1, 1000, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 1000), jnp.int32)

    def loss(q, k, v, seg, pos):
        out = flash_attention_tpu(q, k, v, causal=True, segment_ids=seg, rope=(pos, THETA))
        return jnp.sum(out.astype(jnp.float32))

    with tpu_target():
        exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                                     platforms=["tpu"])(q, k, k, ids, ids)
    module = exported.mlir_module()
    assert module.count("tpu_custom_call") == 3                   # forward, dq, dk/dv
    for name in ("flash_attention_tpu_fwd", "flash_attention_tpu_dq", "flash_attention_tpu_dkv"):
        assert name in module


# Compiles the kernels with Mosaic for a real TPU generation, without a TPU: libtpu's deviceless topology
# (jax.experimental.topologies) runs the full Mosaic compiler, so layout, VMEM and alignment problems show up
# here. Needs the libtpu wheel (not a project dependency): `pip install --target DIR "libtpu==0.0.42.*"`
# (the version jax[tpu] 0.10.2 pins), then PHI4_LIBTPU_DIR=DIR. Run in a subprocess so the test session
# never loads libtpu.
_AOT_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from kernels.pallas_compat import tpu_target
    from kernels.flash_attention_tpu import flash_attention_tpu
    from kernels.rope_pallas import apply_rope_qk_pallas
    from kernels.decode_attention import decode_attention_pallas

    device = topologies.get_topology_desc(platform="tpu", topology_name=sys.argv[1]).devices[0]
    sharding = SingleDeviceSharding(device)
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    b, s, hq, hkv, d = 1, 4000, 40, 10, 128          # phi-4 heads, a ragged length
    q, k, ids = sds((b, s, hq, d), jnp.bfloat16), sds((b, s, hkv, d), jnp.bfloat16), sds((b, s), jnp.int32)
    def attention_loss(q, k, v, seg, pos):
        out = flash_attention_tpu(q, k, v, causal=True, segment_ids=seg, rope=(pos, 250000.0))
        return jnp.sum(out.astype(jnp.float32))
    def rope(q, k, pos):
        return apply_rope_qk_pallas(q, k, pos, theta=250000.0)
    def chunk_loss(q, k, v, q_start, q_seg, kv_seg):   # a context shard's queries at a traced offset
        out = flash_attention_tpu(q, k, v, causal=True, segment_ids=q_seg, kv_segment_ids=kv_seg, q_start=q_start)
        return jnp.sum(out.astype(jnp.float32))
    cache = sds((2, 4096, hkv, d), jnp.bfloat16)
    cases = [(jax.value_and_grad(attention_loss, argnums=(0, 1, 2)), (q, k, k, ids, ids)),
             (jax.value_and_grad(chunk_loss, argnums=(0, 1, 2)),
              (sds((b, 1000, hq, d), jnp.bfloat16), k, k, sds((), jnp.int32), sds((b, 1000), jnp.int32), ids)),
             (jax.value_and_grad(lambda q, k, pos: sum(jnp.sum(x.astype(jnp.float32)) for x in rope(q, k, pos)),
                                 argnums=(0, 1)), (q, k, ids)),
             (decode_attention_pallas, (sds((2, 1, hq, d), jnp.bfloat16), cache, cache, sds((2,), jnp.int32)))]
    for fn, args in cases:
        with tpu_target(device.device_kind, 1):
            lowered = jax.jit(fn).lower(*args)
        lowered.compile()
    print("COMPILED_ALL")
""")


def _libtpu_path() -> str | None:
    """Where libtpu comes from: PHI4_LIBTPU_DIR (a `pip install --target` dir), else the installed wheel (the
    `tpu-aot` extra, which CI installs); None when neither is there."""
    if os.environ.get("PHI4_LIBTPU_DIR"):
        return os.environ["PHI4_LIBTPU_DIR"]
    import importlib.util

    return "" if importlib.util.find_spec("libtpu") is not None else None


@pytest.mark.skipif(_libtpu_path() is None,
                    reason="needs libtpu==0.0.42.* (pip install -e '.[tpu-aot]', or PHI4_LIBTPU_DIR set to a "
                           "`pip install --target` dir of it) to compile the kernels for a real TPU without one")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_kernels_compile_with_mosaic_for_tpu(topology):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # ALLOW_MULTIPLE_LIBTPU_LOAD: other test processes may hold libtpu's lock file at the same time.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [_libtpu_path(), root]))}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, topology], env=env, capture_output=True,
                            text=True, timeout=600)
    assert "COMPILED_ALL" in result.stdout, result.stderr[-4000:]


def test_fp32_and_fused_rope_match_the_float64_oracle():
    """The TPU kernel (forward, dq, dk/dv) against the float64 NumPy oracle (tests/numpy_oracle.py), which shares
    no code with `attention_naive`: GQA 2, causal, packed documents + padding, ragged tail; then the fused-RoPE
    kernel against oracle RoPE followed by oracle attention (positions past 9000). A wrong causal boundary in
    the kernel's mask (`q_pos > k_pos`: a token not seeing itself) fails this test."""
    import numpy_oracle

    b, s, hq, hkv, d = 2, 200, 4, 2, 128
    q, k, v, dout = _inputs(11, b, s, hq, hkv, d)
    seg = _packed_segments(b, s, 12)
    attn = lambda q, k, v: flash_attention_tpu(q, k, v, causal=True, segment_ids=seg,
                                               interpret=INTERPRET, **BLOCKS)
    numpy_oracle.assert_attention_close(attn, q, k, v, dout, causal=True, segment_ids=seg, out_atol=1e-4,
                                        grad_rtol=1e-4)

    pos = np.asarray(_positions(seg)) + np.array([[9000], [0]])
    fused = flash_attention_tpu(q, k, v, causal=True, segment_ids=seg, interpret=INTERPRET,
                                rope=(jnp.asarray(pos, jnp.int32), THETA), **BLOCKS)
    want, _ = numpy_oracle.attention(numpy_oracle.rope(q, pos, THETA), numpy_oracle.rope(k, pos, THETA), v,
                                     causal=True, segment_ids=seg)
    # Row 1 has positions < 200: fp32 agrees to rounding. Row 0 starts at 9000, where fp32 angles are off by
    # ~5e-4 rad (see numpy_oracle.rope_angle_tolerance); observed 1.4e-4 on the output, allowed 2e-3.
    np.testing.assert_allclose(np.asarray(fused)[1], want[1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(fused)[0], want[0], atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def query_chunk_attention():
    """One jitted kernel call (forward + VJP) whose query offset is a traced argument, as under context
    parallelism (`lax.axis_index` x chunk length): every offset below reuses the same compiled program."""

    def run(q, k, v, q_start, q_seg, kv_seg, dout):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention_tpu(
            q, k, v, causal=True, segment_ids=q_seg, kv_segment_ids=kv_seg, q_start=q_start,
            interpret=INTERPRET, **BLOCKS), q, k, v)
        return out, vjp(dout)

    return jax.jit(run)


@pytest.mark.parametrize("q_start", [120, 248])
def test_query_chunk_at_an_offset_matches_the_float64_oracle(query_chunk_attention, q_start):
    """A chunk of 136 queries (two q blocks, the second ragged) at key index `q_start` of 384 keys (three kv
    blocks), GQA 2, packed documents that cross the chunk's edges and a padding tail, each side with its own
    segment ids; forward, dq, dk, dv against the float64 NumPy oracle (query i at position q_start + i).
    At 120 the chunk ends at key 255, so kv block 2 is skipped by the offset-aware causal block skipping and its
    dk/dv must be exactly zero; at 248 the chunk reaches the last key. Ignoring the offset (index-causal
    masking), taking the queries' segment ids for the keys, or skipping a kv block a query still sees
    (e.g. the last-row bound computed without q_start) fails this test."""
    import numpy_oracle

    b, sk, sq, hq, hkv, d = 1, 384, 136, 4, 2, 64
    q, k, v, dout = _inputs(21, b, sk, hq, hkv, d)
    q, dout = q[:, q_start:q_start + sq], dout[:, q_start:q_start + sq]
    kv_seg = np.array(_packed_segments(b, sk, 22))
    kv_seg[:, 250:262] = 4                      # a document across block 1 / 2 and the first chunk's end
    kv_seg[:, -9:] = 0                          # padding tail
    q_seg = kv_seg[:, q_start:q_start + sq]
    out, grads = query_chunk_attention(q, k, v, jnp.int32(q_start), q_seg, kv_seg, dout)

    kw = dict(causal=True, segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=q_start)
    want_out, _ = numpy_oracle.attention(q, k, v, **kw)
    want_grads = numpy_oracle.attention_vjp(q, k, v, dout, **kw)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-4, rtol=0)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        scale = np.max(np.abs(w))
        assert scale > 0.1, name
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4 * scale, rtol=0, err_msg=name)
    if q_start + sq <= 256:
        assert not np.any(np.asarray(grads[1])[:, 256:]) and not np.any(np.asarray(grads[2])[:, 256:])


@pytest.mark.parametrize("sq, kwargs, match", [
    (64, {}, "needs q_start"),
    (128, {"kv_segment_ids": jnp.ones((1, 128), jnp.int32)}, "kv_segment_ids needs segment_ids"),
    (64, {"q_start": 64, "segment_ids": jnp.ones((1, 64), jnp.int32)}, "give kv_segment_ids"),
    (64, {"q_start": -1}, "q_start must be >= 0"),
    (64, {"q_start": jnp.zeros((2,), jnp.int32)}, "q_start must be an integer scalar"),
    (64, {"q_start": 64, "segment_ids": jnp.ones((1, 64), jnp.int32),
          "kv_segment_ids": jnp.ones((1, 64), jnp.int32)}, r"kv_segment_ids must be integer \[batch, seq\]"),
    (128, {"rope": (jnp.zeros((1, 128), jnp.int32), THETA), "q_start": 0}, "fused RoPE needs q and k/v"),
])
def test_query_chunk_misuse_is_refused_clearly(sq, kwargs, match):
    q = jnp.zeros((1, sq, 2, 128))
    kv = jnp.zeros((1, 128, 1, 128))
    with pytest.raises(AttentionConfigError, match=match):
        flash_attention_tpu(q, kv, kv, interpret=INTERPRET, **kwargs)
