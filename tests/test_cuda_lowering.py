"""Real CUDA lowering of every GPU path, on a CPU: `jax.export(jax.jit(f), platforms=["cuda"])`.

Exporting for CUDA runs Mosaic GPU's own lowering in Python (register layout checks, wgmma operand and
transpose checks, TMA and barrier lowering, the shared-memory limit of 227 KiB) without a GPU, so a kernel
that passes here is one the GPU toolchain accepts up to PTX generation. Not covered: ptxas (register
allocation / spills) and running on a GPU; those need Hopper hardware (tests/test_flash_attention_gpu.py's
`test_wgmma_path_needs_gpu`, bench/gpu_suite.py).

Checked here:
- `kernels.flash_attention` and `kernels.flash_attention_rope` with implementation="pallas_gpu": forward and
  gradients w.r.t. q, k, v; with and without segment ids; head_dim 64, 128 and 256; bf16; GQA 8 q / 2 kv heads;
  sequence 256 (and a ragged 320). The exported module must hold the Mosaic GPU custom call (one per kernel:
  forward; forward, dq, dk/dv for gradients) and the right output avals.
- Lowering semantics: the kernel pins Lane (JAX 0.10's default); JAX 0.11 made Warpgroup the default, and
  one case checks that the kernel lowers under Warpgroup too.
- Shared memory: the kernel's static SMEM estimate bounds Mosaic's own count, oversized explicit blocks get an
  AttentionConfigError, head_dim 256 picks blocks that fit.
- The Hopper check follows the lowering target: export for CUDA passes on a CPU host; jit for the CPU, or a
  non-Hopper local GPU, is refused with a clear error.
- Decode attention and RoPE "pallas" implementations are routed to XLA when lowered for CUDA (their plain
  `pl.pallas_call`s would go to Mosaic GPU, which rejects them): the module has no custom call at all.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import kernels
from kernels import flash_attention_gpu as fag
from kernels import pallas_compat
from kernels.decode_attention import decode_attention
from kernels.rope_pallas import _rope_xla, apply_rope_pallas, apply_rope_qk_pallas
from kernels.rope_reference import apply_rope_reference

B, S, HQ, HKV = 1, 256, 8, 2
THETA = 10000.0
MOSAIC_CALL = re.compile(r"stablehlo\.custom_call @mosaic_gpu")


def _sds(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _export_cuda(f, *args):
    return jax.export.export(jax.jit(f), platforms=["cuda"])(*args)


def _attention_fn(rope, segments, grad):
    """f(q, k, v, segment_ids, positions) -> output, or its gradients w.r.t. q, k, v."""
    def attend(q, k, v, seg, pos):
        seg = seg if segments else None
        if rope:
            return kernels.flash_attention_rope(q, k, v, pos, theta=THETA, causal=True, segment_ids=seg,
                                                implementation="pallas_gpu")
        return kernels.flash_attention(q, k, v, causal=True, segment_ids=seg, implementation="pallas_gpu")

    if not grad:
        return attend

    def grads(q, k, v, seg, pos):
        loss = lambda q, k, v: attend(q, k, v, seg, pos).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return grads


def _attention_args(d, s=S):
    return (_sds(B, s, HQ, d), _sds(B, s, HKV, d), _sds(B, s, HKV, d), _sds(B, s, dtype=jnp.int32),
            _sds(B, s, dtype=jnp.int32))


def _avals(exported):
    return [(tuple(a.shape), jnp.dtype(a.dtype)) for a in exported.out_avals]


def _expected_avals(d, grad, s=S):
    q, k = (B, s, HQ, d), (B, s, HKV, d)
    shapes = (q, k, k) if grad else (q,)
    return [(shape, jnp.dtype(jnp.bfloat16)) for shape in shapes]


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("segments", [False, True], ids=["nosegs", "segs"])
@pytest.mark.parametrize("rope", [False, True], ids=["attn", "rope"])
@pytest.mark.parametrize("d", [64, 128])
def test_flash_attention_lowers_for_cuda(d, rope, segments, grad):
    exported = _export_cuda(_attention_fn(rope, segments, grad), *_attention_args(d))
    text = exported.mlir_module()
    assert len(MOSAIC_CALL.findall(text)) == (3 if grad else 1)
    assert "flash_attention_fwd" in text
    if grad:
        assert "flash_attention_bwd_dq" in text and "flash_attention_bwd_dkv" in text
    assert _avals(exported) == _expected_avals(d, grad)
    assert exported.platforms == ("cuda",)


def test_head_dim_256_and_ragged_sequence_lower_for_cuda():
    """head_dim 256 gets blocks that fit in SMEM (block_kv 64, one compute warpgroup); a sequence that is not
    a block multiple (320) is padded; fused RoPE and segment ids on top."""
    exported = _export_cuda(_attention_fn(True, True, True), *_attention_args(256, s=320))
    assert len(MOSAIC_CALL.findall(exported.mlir_module())) == 3
    assert _avals(exported) == _expected_avals(256, True, s=320)


def test_lane_semantics_pinned_and_warpgroup_semantics_lowers_too(monkeypatch):
    monkeypatch.delenv(fag.SEMANTICS_ENV, raising=False)
    assert fag._compiler_params().lowering_semantics == plgpu.LoweringSemantics.Lane
    monkeypatch.setenv(fag.SEMANTICS_ENV, "warpgroup")   # what bench/attention_probe.py sets for its retry
    assert fag._compiler_params().lowering_semantics == plgpu.LoweringSemantics.Warpgroup
    exported = _export_cuda(_attention_fn(False, True, True), *_attention_args(128))
    assert len(MOSAIC_CALL.findall(exported.mlir_module())) == 3


@pytest.mark.parametrize("d, rope", [(128, True), (256, True)])
def test_smem_estimate_bounds_mosaics_own_count(d, rope):
    """Under an artificial SMEM limit equal to our estimate, Mosaic's lowering (which counts the real
    allocation) still passes; 4 KiB less, the largest kernel no longer fits: the estimate is an upper bound
    within 4 KiB, so the AttentionConfigError guard refuses what Mosaic would, and little more."""
    from jax.experimental.mosaic.gpu import (
        core as mosaic_core,  # test-only hook of Mosaic GPU
    )

    args = _attention_args(d)
    cfg = fag._make_cfg(args[0], args[1], True, True, None, False, (None, THETA) if rope else None,
                        dict.fromkeys(fag._BLOCK_FIELDS))
    usage = fag.smem_usage(cfg)
    assert max(usage.values()) <= fag.SMEM_LIMIT_BYTES
    f = _attention_fn(rope, True, True)
    jax.clear_caches()  # lowerings are cached; the limit must be seen by a fresh one
    with (mosaic_core.artificial_shared_memory_limit(max(usage.values()) - 4096),
          pytest.raises(ValueError, match="exceeds available shared memory")):
        _export_cuda(f, *args)
    jax.clear_caches()
    with mosaic_core.artificial_shared_memory_limit(max(usage.values())):
        _export_cuda(f, *args)


def test_oversized_tiles_get_a_config_error_not_a_mosaic_value_error():
    q, k, v = _attention_args(256)[:3]
    big = {"block_q": 64, "block_kv": 128, "block_q_bwd": 64, "block_kv_bwd": 64, "num_stages": 2,
           "num_compute_wgs": 2}
    f = lambda q, k, v: fag.flash_attention_gpu(q, k, v, **big)
    with pytest.raises(kernels.AttentionConfigError,
                       match=r"head_dim 256 .* needs more shared memory than Hopper's 227 KiB per block "
                             r"\(forward kernel ~326 KiB"):
        _export_cuda(f, q, k, v)
    with pytest.raises(kernels.AttentionConfigError, match=r"head_dim must be a multiple of 64 in \[64, 256\]"):
        _export_cuda(lambda q, k, v: kernels.flash_attention(q, k, v, implementation="pallas_gpu"),
                     _sds(B, S, HQ, 512), _sds(B, S, HKV, 512), _sds(B, S, HKV, 512))


def test_float32_is_refused_under_cuda_export_too():
    args = [_sds(B, S, HQ, 128, dtype=jnp.float32)] + [_sds(B, S, HKV, 128, dtype=jnp.float32)] * 2
    with pytest.raises(kernels.AttentionConfigError, match="float32 inputs are not supported"):
        _export_cuda(lambda q, k, v: kernels.flash_attention(q, k, v, implementation="pallas_gpu"), *args)


def test_hopper_check_follows_the_lowering_target(monkeypatch):
    f = lambda q, k, v: kernels.flash_attention(q, k, v, implementation="pallas_gpu")
    args = _attention_args(64, s=192)[:3]
    # jit for this CPU: refused when lowering, naming the target.
    with pytest.raises(kernels.AttentionConfigError, match="needs a Hopper GPU .* being lowered for cpu"):
        jax.jit(f).lower(*args)
    # run eagerly on the CPU: refused.
    zeros = [jnp.zeros(a.shape, a.dtype) for a in args]
    with pytest.raises(kernels.AttentionConfigError, match="needs a Hopper GPU .* run eagerly on 'cpu'"):
        f(*zeros)
    # a CUDA lowering in a process whose GPU is not a Hopper: refused.
    a100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    monkeypatch.setattr(pallas_compat, "_local_gpu", lambda: a100)
    with pytest.raises(kernels.AttentionConfigError, match="this process's GPU is 'NVIDIA A100-SXM4-80GB'"):
        _export_cuda(f, *args)


def test_decode_attention_pallas_routes_to_xla_for_cuda():
    args = (_sds(2, 3, HQ, 128), _sds(2, 512, HKV, 128), _sds(2, 512, HKV, 128), _sds(2, dtype=jnp.int32))
    exported = _export_cuda(lambda *a: decode_attention(*a, implementation="pallas"), *args)
    assert "custom_call" not in exported.mlir_module()
    assert _avals(exported) == [((2, 3, HQ, 128), jnp.dtype(jnp.bfloat16))]


def test_rope_pallas_routes_to_xla_for_cuda_forward_and_backward():
    def f(q, k, pos):
        loss = lambda q, k: sum(x.astype(jnp.float32).sum() for x in apply_rope_qk_pallas(q, k, pos, theta=THETA))
        return apply_rope_pallas(q, pos, theta=THETA), jax.grad(loss, argnums=(0, 1))(q, k)
    exported = _export_cuda(f, _sds(2, S, HQ, 128), _sds(2, S, HKV, 128), _sds(2, S, dtype=jnp.int32))
    assert "custom_call" not in exported.mlir_module()
    q, k = ((2, S, HQ, 128), jnp.dtype(jnp.bfloat16)), ((2, S, HKV, 128), jnp.dtype(jnp.bfloat16))
    assert _avals(exported) == [q, q, k]


def test_rope_xla_route_is_the_reference_rotation():
    """The XLA rotation the RoPE kernel becomes on a GPU: equal to the reference, and its inverse undoes it."""
    x = jax.random.normal(jax.random.key(0), (2, 64, 3, 64), jnp.float32)
    pos = jax.random.randint(jax.random.key(1), (2, 64), 0, 20000)
    rotated = _rope_xla((x,), pos, theta=THETA, inverse=False)[0]
    np.testing.assert_allclose(rotated, apply_rope_reference(x, pos, theta=THETA), atol=1e-6)
    np.testing.assert_allclose(_rope_xla((rotated,), pos, theta=THETA, inverse=True)[0], x, atol=2e-5)
