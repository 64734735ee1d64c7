"""Mosaic GPU flash attention (kernels/flash_attention_gpu.py) against the pure-JAX reference, on CPU.

The kernels run in Mosaic GPU interpret mode, which simulates SMEM, TMA copies, barriers and the
warpgroup threads, so the pipeline (producer/consumer barriers, ring-slot reuse), indexing, masking,
online softmax, LSE and the dq / dk-dv kernels are all exercised here. Two things only run on a GPU:
register layouts (the interpreter has no layout casts) and the wgmma instructions themselves (the
interpreter takes neither transposed nor register operands, so those products run as dot_general there);
`test_wgmma_path_needs_gpu` names that gap.

Tolerances: bf16 inputs are compared with an fp32 reference on the same (bf16-rounded) inputs.
Outputs: absolute 2e-2 (values are O(1)); gradients: 2e-2 absolute plus 2e-2 relative to the largest
reference gradient entry (bf16 probabilities and dS feed the matmuls, as in any bf16 flash attention).
Interpretation is slow, so shapes are tiny and each case runs its three kernels once.

Fused RoPE (`rope=(positions, theta)`) is compared with `apply_rope_reference` on q and k followed by
`attention_naive` in fp32 (the reference rotates in fp32 and rounds the rotated q/k to bf16, as the kernel
does in SMEM), with the same bf16 tolerances as above; gradients are w.r.t. the un-rotated q and k.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_mode import interpret_for

import kernels
from kernels import mosaic_gpu_interpret
from kernels.attention_reference import attention_naive
from kernels.flash_attention_gpu import flash_attention_gpu
from kernels.rope_reference import apply_rope_reference

# Interpret mode on CPU; compiled on a Hopper GPU under PHI4_KERNEL_TESTS_ON_DEVICE=1 (bench/gpu_suite.py).
INTERPRET = interpret_for("gpu")

pytestmark = pytest.mark.skipif(INTERPRET and not mosaic_gpu_interpret.is_available(),
                                reason="this JAX has no Mosaic GPU interpret mode")

OUT_ATOL = 2e-2
GRAD_TOL = 2e-2


def _inputs(seed, b, s, hq, hkv, d, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype)
    dout = jax.random.normal(ks[3], (b, s, hq, d), jnp.float32)
    return q, k, v, dout


def _packed_segments(b, s, seed, pad_tail):
    """Random packed documents 1..3 in order per row, the last `pad_tail` tokens padding (segment 0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, s), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s - pad_tail), size=2, replace=False))
        seg[i, :cuts[0]] = 1
        seg[i, cuts[0]:cuts[1]] = 2
        seg[i, cuts[1]:s - pad_tail] = 3
    return jnp.asarray(seg)


def _f32(x):
    return x.astype(jnp.float32)


def _positions_per_document(seg, offset):
    """Positions restarting at `offset` at each document start (a change of segment id), as for packed data."""
    seg = np.asarray(seg)
    pos = np.zeros(seg.shape, np.int32)
    for row in range(seg.shape[0]):
        start = 0
        for i in range(seg.shape[1]):
            if i and seg[row, i] != seg[row, i - 1]:
                start = i
            pos[row, i] = offset + i - start
    return jnp.asarray(pos)


def _check(attn, q, k, v, dout, *, causal, segment_ids, grads=True, rope=None):
    """Kernel output (and q/k/v gradients) vs attention_naive in fp32 on the same inputs; with
    rope=(positions, theta), of q and k rotated by apply_rope_reference first."""
    def ref(q, k, v):
        if rope is not None:
            q, k = (_f32(apply_rope_reference(x.astype(q_dtype), rope[0], theta=rope[1])) for x in (q, k))
        return attention_naive(q, k, v, causal=causal, segment_ids=segment_ids)

    q_dtype = q.dtype
    ref_out, ref_vjp = jax.vjp(ref, _f32(q), _f32(k), _f32(v))
    if not grads:
        out = attn(q, k, v)
        assert out.dtype == q.dtype and out.shape == q.shape
        chex.assert_trees_all_close(_f32(out), ref_out, atol=OUT_ATOL, rtol=0)
        return
    out, vjp = jax.vjp(attn, q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    chex.assert_trees_all_close(_f32(out), ref_out, atol=OUT_ATOL, rtol=0)
    got = vjp(dout.astype(out.dtype))
    want = ref_vjp(dout)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        scale = float(jnp.max(jnp.abs(w)))
        chex.assert_trees_all_close(_f32(g), w, atol=GRAD_TOL + GRAD_TOL * scale, rtol=0,
                                    custom_message=f"{name} differs from the reference")


def test_gqa2_causal_forward_through_dispatch():
    """GQA 2, causal, head_dim 64, on the block grid, via kernels.flash_attention(implementation='pallas_gpu')
    (forward; the GQA 1 and 4 tests below check gradients)."""
    q, k, v, dout = _inputs(0, 1, 128, 2, 1, 64)
    attn = lambda q, k, v: kernels.flash_attention(q, k, v, causal=True, implementation="pallas_gpu",
                                                   interpret=INTERPRET)
    _check(attn, q, k, v, dout, causal=True, segment_ids=None, grads=False)


def test_head_dim_128_noncausal_mha():
    """GQA 1 (plain multi-head), not causal, head_dim 128 (phi-4's), default blocks (forward 64 x 128,
    backward 64 x 64)."""
    q, k, v, dout = _inputs(1, 1, 128, 1, 1, 128)
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=False, interpret=INTERPRET)
    _check(attn, q, k, v, dout, causal=False, segment_ids=None)


def test_gqa8_causal_gradients():
    """GQA 8 (phi-4 has 4; Llama-style models go to 8): one kv head serves eight query heads, so the dk/dv
    kernel sums eight heads' contributions. Causal, head_dim 64, off the block grid (S=72), forward and
    gradients."""
    q, k, v, dout = _inputs(8, 1, 72, 8, 1, 64)
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=True, interpret=INTERPRET, block_kv=64)
    _check(attn, q, k, v, dout, causal=True, segment_ids=None)


def test_gqa4_causal_segments_padding_off_grid():
    """GQA 4, causal, packed segments with padding, length 120 (padded to 128 inside). The dk/dv kernel
    streams 4 q heads x 2 q blocks through 2 ring slots (slot reuse in the backward)."""
    s = 120
    q, k, v, dout = _inputs(2, 1, s, 4, 1, 64)
    seg = _packed_segments(1, s, seed=2, pad_tail=9)
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=True, segment_ids=seg, interpret=INTERPRET,
                                               block_q=64, block_kv=64)
    _check(attn, q, k, v, dout, causal=True, segment_ids=seg)


def test_batch2_noncausal_segments_off_grid():
    """Batch 2, not causal, packed segments with padding (per-row layouts), length 100 (off the grid)."""
    s = 100
    q, k, v, dout = _inputs(3, 2, s, 1, 1, 64)
    seg = _packed_segments(2, s, seed=3, pad_tail=5)
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=False, segment_ids=seg, interpret=INTERPRET,
                                               block_q=64, block_kv=64)
    _check(attn, q, k, v, dout, causal=False, segment_ids=seg)


def test_forward_race_free_three_stages_segments():
    """The interpreter's happens-before race detector over the forward pipeline: 2 compute warpgroups +
    the producer, causal, packed segments (key-segment buffers ride the ring too), 4 kv steps through a
    3-slot ring. (Removing the producer's wait on the 'consumed' barrier makes this detector report
    races: checked while writing this test.)"""
    s = 256
    q, k, v, dout = _inputs(4, 1, s, 1, 1, 64)
    seg = jnp.asarray(np.repeat(np.array([[1, 2, 0]], np.int32), [100, 150, 6], axis=1))
    mosaic_gpu_interpret.reset_state()
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=True, segment_ids=seg, block_q=64,
                                               block_kv=64, num_stages=3, interpret={"detect_races": True})
    _check(attn, q, k, v, dout, causal=True, segment_ids=seg, grads=False)
    assert not mosaic_gpu_interpret.races_found()


@pytest.mark.parametrize("use_jit", [True, False])
def test_one_warpgroup_forward(use_jit):
    """The num_compute_wgs=1 configuration (jit and eager), bf16, non-causal."""
    q, k, v, dout = _inputs(5, 1, 128, 1, 1, 64)
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=False, interpret=INTERPRET, block_kv=64,
                                               num_compute_wgs=1)
    _check(jax.jit(attn) if use_jit else attn, q, k, v, dout, causal=False, segment_ids=None, grads=False)


@pytest.mark.parametrize("rope", [False, True])
def test_float32_inputs_are_refused_not_rounded(rope):
    """float32 is never computed in bf16 behind the caller's back: the kernel and the explicit dispatch refuse
    it, naming the way out; the default dispatch takes the float32 (XLA) path."""
    q, k, v, _ = _inputs(5, 1, 64, 2, 1, 64, dtype=jnp.float32)
    positions = jnp.arange(64, dtype=jnp.int32)[None]
    with pytest.raises(kernels.AttentionConfigError, match="float32 inputs are not supported.*implementation='xla'"):
        flash_attention_gpu(q, k, v, interpret=INTERPRET, rope=(positions, 1e4) if rope else None)
    with pytest.raises(kernels.AttentionConfigError, match="float32 inputs are not supported"):
        if rope:
            kernels.flash_attention_rope(q, k, v, positions, theta=1e4, implementation="pallas_gpu", interpret=True)
        else:
            kernels.flash_attention(q, k, v, implementation="pallas_gpu", interpret=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_q=48), "block_q must be a positive multiple of 64"),
    (dict(block_kv_bwd=256), "block_kv_bwd (256) is a per-warpgroup register tile"),
    (dict(block_kv=256, num_stages=4), "needs more shared memory than Hopper's 227 KiB per block (forward kernel"),
    (dict(num_stages=1), "num_stages must be >= 2"),
    (dict(rope=(None, 10000.0)), "rope positions must be integer [batch, seq] = (1, 64), got None[]"),
    (dict(rope=(jnp.zeros((1, 64), jnp.float32), 1e4)), "rope positions must be integer"),
    (dict(rope=(jnp.zeros((1, 64), jnp.int32), 0.0)), "rope theta must be positive"),
    (dict(rope=jnp.zeros((1, 64), jnp.int32)), "rope must be a (positions, theta) tuple"),
])
def test_bad_options_raise_config_error(kwargs, message):
    q, k, v, _ = _inputs(0, 1, 64, 2, 1, 64)
    with pytest.raises(kernels.AttentionConfigError, match=re.escape(message)):
        flash_attention_gpu(q, k, v, causal=True, interpret=INTERPRET, **kwargs)


def test_fused_rope_gqa2_causal_packed_documents_off_grid():
    """Fused RoPE, theta 250000, GQA 2, causal, packed segments with padding, positions restarting per
    document at offset 3000 (so angles need the kernel's range reduction), length 120 (padded inside),
    head_dim 64 (the 64-byte swizzle case); forward and dq, dk, dv. The dk/dv kernel rotates q tiles
    streamed through the ring (2 q heads x 2 q blocks, slot reuse) and rotates dk back."""
    s = 120
    q, k, v, dout = _inputs(7, 1, s, 2, 1, 64)
    seg = _packed_segments(1, s, seed=7, pad_tail=9)
    rope = (_positions_per_document(seg, offset=3000), 250000.0)
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=True, segment_ids=seg, interpret=INTERPRET,
                                               block_q=64, block_kv=64, rope=rope)
    _check(attn, q, k, v, dout, causal=True, segment_ids=seg, rope=rope)


def test_fused_rope_head_dim_128_gqa2_through_dispatch():
    """Fused RoPE via kernels.flash_attention_rope(implementation='pallas_gpu'): head_dim 128 (phi-4's),
    GQA 2, causal, theta 250000, positions offset by 7000, default blocks: the
    forward's 128-row K tiles are rotated half by each compute warpgroup before either reads them (and the
    dq kernel's 64-row K tiles by one of them); forward and gradients."""
    s = 128
    q, k, v, dout = _inputs(8, 1, s, 2, 1, 128)
    positions = jnp.arange(s, dtype=jnp.int32)[None] + 7000
    attn = lambda q, k, v: kernels.flash_attention_rope(q, k, v, positions, theta=250000.0, causal=True,
                                                        implementation="pallas_gpu", interpret=INTERPRET)
    _check(attn, q, k, v, dout, causal=True, segment_ids=None, rope=(positions, 250000.0))


def test_fused_rope_race_free_forward_and_backward():
    """The interpreter's race detector over all three kernels with fused RoPE: the compute warpgroups
    rotate their chunks of each shared ring tile in place (forward: 128-row K tiles, one chunk each; dq:
    64-row K tiles and dk/dv: 64-row q tiles, rotated by warpgroup 0 while warpgroup 1 waits), ordered by
    the per-slot 'rotated' barrier before the other warpgroup reads and before the producer refills the
    slot. Not causal, so every step is computed by both warpgroups."""
    s = 128
    q, k, v, dout = _inputs(9, 1, s, 1, 1, 64)
    rope = (jnp.arange(s, dtype=jnp.int32)[None] + 11, 10000.0)
    mosaic_gpu_interpret.reset_state()
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=False, block_q=64, block_kv=128,
                                               interpret={"detect_races": True}, rope=rope)
    _check(attn, q, k, v, dout, causal=False, segment_ids=None, rope=rope)
    assert not mosaic_gpu_interpret.races_found()


def test_bad_shapes_raise_config_error():
    q, k, v, _ = _inputs(0, 1, 64, 2, 1, 96)
    with pytest.raises(kernels.AttentionConfigError, match="head_dim must be a multiple of 64"):
        flash_attention_gpu(q, k, v, causal=True, interpret=INTERPRET)
    q, k, v, _ = _inputs(0, 1, 64, 3, 2, 64)
    with pytest.raises(kernels.AttentionConfigError, match="multiple of kv heads"):
        flash_attention_gpu(q, k, v, causal=True, interpret=INTERPRET)


def test_needs_gpu_without_interpret():
    if jax.devices()[0].platform == "gpu":
        pytest.skip("a GPU is present: the compiled path is what runs")
    q, k, v, _ = _inputs(0, 1, 64, 2, 1, 64)
    with pytest.raises(kernels.AttentionConfigError, match="needs a Hopper GPU"):
        flash_attention_gpu(q, k, v, causal=True)


def test_wgmma_path_needs_gpu():
    """The compiled kernel (register layouts, real wgmma with transposed / register operands, run_state
    accumulators) can only be checked on a Hopper GPU: this test runs there and is skipped elsewhere."""
    if not kernels.is_hopper_gpu(jax.devices()[0]):
        pytest.skip("needs a Hopper GPU: the Mosaic GPU interpreter cannot run wgmma with transposed or "
                    "register operands, layout casts or run_state, so the compiled path is untested here")
    q, k, v, dout = _inputs(6, 2, 1000, 8, 2, 128)
    seg = _packed_segments(2, 1000, seed=6, pad_tail=17)
    for causal in (True, False):
        attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=causal, segment_ids=seg)
        _check(attn, q, k, v, dout, causal=causal, segment_ids=seg)


# bf16 error of the kernel against the float64 oracle, as a multiple of XLA's own bf16 error (attention_naive
# on the same bf16 inputs, autodiff gradients) against the same oracle; plus a floor for errors near zero.
BF16_ERROR_VS_XLA = 3.0


@pytest.mark.parametrize("b,s,hq,hkv,d,causal,pad_tail", [
    (1, 120, 4, 1, 64, True, 9),       # GQA 4, causal, packed segments + padding, off the grid
    (1, 128, 2, 2, 128, False, None),  # MHA, not causal, head_dim 128
])
def test_bf16_error_no_worse_than_xla_bf16_against_float64_oracle(b, s, hq, hkv, d, causal, pad_tail):
    """Forward and gradients against the float64 NumPy oracle (tests/numpy_oracle.py, sharing no code with
    `attention_naive`) on the bf16 inputs: within the absolute bounds above, and no worse than
    BF16_ERROR_VS_XLA x the error of XLA's bf16 attention on the same inputs. A 2% error in dk (the dk/dv
    kernel scaling dk by 1.02) stays under the absolute bounds of the other tests here but fails this one."""
    import numpy_oracle

    q, k, v, dout = _inputs(20 + d, b, s, hq, hkv, d)
    seg = None if pad_tail is None else _packed_segments(b, s, seed=21, pad_tail=pad_tail)
    attn = lambda q, k, v: flash_attention_gpu(q, k, v, causal=causal, segment_ids=seg,
                                               interpret=INTERPRET, block_q=64, block_kv=64)
    xla = lambda q, k, v: attention_naive(q, k, v, causal=causal, segment_ids=seg)
    ours = numpy_oracle.assert_attention_close(attn, q, k, v, dout, causal=causal, segment_ids=seg,
                                               out_atol=OUT_ATOL, grad_rtol=2 * GRAD_TOL)
    ref = numpy_oracle.attention_errors(xla, q, k, v, dout, causal=causal, segment_ids=seg)
    for name, (err, scale) in ours.items():
        err_xla = ref[name][0]
        assert err <= BF16_ERROR_VS_XLA * err_xla + 1e-3 * scale, (
            f"{name}: bf16 error {err:.3g} vs XLA bf16's {err_xla:.3g} (max |{name}| {scale:.3g})")


def test_lowering_semantics_follow_the_environment(monkeypatch):
    """PHI4_MOSAIC_GPU_SEMANTICS picks Mosaic GPU's lowering semantics (Lane by default; the GPU suite's probe
    retries a failed compile with Warpgroup); a bad value is refused naming the variable."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from kernels import flash_attention_gpu as fa

    if "lowering_semantics" not in getattr(plgpu.CompilerParams, "__dataclass_fields__", {}):
        pytest.skip("this JAX's Mosaic GPU has no selectable lowering semantics")
    monkeypatch.delenv(fa.SEMANTICS_ENV, raising=False)
    assert fa._compiler_params().lowering_semantics == plgpu.LoweringSemantics.Lane
    monkeypatch.setenv(fa.SEMANTICS_ENV, "Warpgroup")
    assert fa._compiler_params().lowering_semantics == plgpu.LoweringSemantics.Warpgroup
    monkeypatch.setenv(fa.SEMANTICS_ENV, "lanes")
    with pytest.raises(kernels.AttentionConfigError, match="PHI4_MOSAIC_GPU_SEMANTICS='lanes'"):
        fa._compiler_params()
