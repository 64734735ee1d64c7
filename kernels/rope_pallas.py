"""Rotary position embedding (NeoX rotate-half) as a Pallas kernel, alone or rotating q and k in one pass.

- `apply_rope_pallas(x, positions, *, theta, interpret=False)`: x [B, S, H, D], positions [B, S] int.
- `apply_rope_qk_pallas(q, k, positions, *, theta, interpret=False)`: q [B, S, Hq, D] and k [B, S, Hkv, D]
  rotated by the same kernel launch (one read and one write of each).

Math is `kernels.rope_reference`: angles = position * inv_freq computed in float32 inside the kernel from
the integer positions (so packed documents and decode offsets need nothing special), result in x's dtype.
Differentiable: the backward pass is the same kernel rotating the cotangent by -angle (`jax.custom_vjp`).

The kernel is a plain (backend-neutral) `pl.pallas_call`: grid (batch, sequence blocks), each step one
[block_s, H * D] slab (heads folded into the lane axis, a free reshape); cos/sin are computed once per row
and reused by every head; rotate-half is built from lane rolls. block_s shrinks so the slabs stay small in
VMEM (phi-4's 40 + 10 heads: 80 rows).

Backend notes. TPU: the rolls are `pltpu.roll` (native lane rotates); head_dim a multiple of 128 keeps the
per-head lane slices vreg-aligned (phi-4: 128; 64 compiles too); block_s a multiple of 8. Mosaic compiles it
for v5e/v6e at phi-4 shapes (see tests/test_flash_attention_tpu.py). GPU: a plain `pl.pallas_call` goes to
Mosaic GPU there, which does not take this kernel (its [block_s, H * D] slabs overflow SMEM), and the Triton
lowering needs power-of-two block shapes and has no lane roll; so when lowered for a GPU (CUDA or ROCm) the
rotation is routed, by `jax.lax.platform_dependent` at lowering time, to the same math in XLA (which fuses it
well), forward and backward, even when this module is called explicitly. tests/test_cuda_lowering.py checks that
an export for CUDA contains no Pallas call. The dispatch default (`apply_rope(implementation=None)`) is the XLA
reference everywhere but in interpret mode. On CPU the kernel runs with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.dispatch import AttentionConfigError
from kernels.pallas_compat import on_tpu, rope_cos_sin, rotate_with
from kernels.rope_reference import rope_inv_freq

DEFAULT_BLOCK_S = 256
_BLOCK_ELEMENTS = 1 << 19   # cap on block_s * (sum of H * D over the inputs)


def _rope_kernel(pos_ref, freq_ref, *refs, n, head_dim, inverse, tpu):
    x_refs, o_refs = refs[:n], refs[n:]
    # cos/sin once per row for one head's D lanes, then every head of every input reuses them.
    cos, sin = rope_cos_sin(pos_ref[...], freq_ref[...], inverse=inverse)   # [block_s, D]
    for x_ref, o_ref in zip(x_refs, o_refs):
        for h in range(x_ref.shape[-1] // head_dim):
            lanes = slice(h * head_dim, (h + 1) * head_dim)
            rotated = rotate_with(x_ref[:, lanes], cos, sin, head_dim, tpu=tpu)
            o_ref[:, lanes] = rotated.astype(o_ref.dtype)


def _rope_call(xs, positions, theta, inverse, interpret, block_s):
    """Rotates each x in xs ([B, S, H_i, D], same B, S, D) by the angles of positions [B, S]: the Pallas kernel,
    or XLA when lowered for a GPU (see the module docstring)."""
    kernel = functools.partial(_rope_kernel_call, theta=theta, inverse=inverse, interpret=interpret, block_s=block_s)
    if interpret:
        return kernel(xs, positions)
    xla = functools.partial(_rope_xla, theta=theta, inverse=inverse)
    return jax.lax.platform_dependent(xs, positions, cuda=xla, rocm=xla, default=kernel)


def _rope_xla(xs, positions, *, theta, inverse):
    """The kernel's math in plain JAX: fp32 angles from the integer positions, rotate-half per head."""
    d = xs[0].shape[-1]
    freq = rope_inv_freq(d, theta)
    cos, sin = rope_cos_sin(positions.astype(jnp.int32)[:, :, None, None],
                            jnp.concatenate([freq, freq]), inverse=inverse)   # [B, S, 1, D]
    return tuple(rotate_with(x, cos, sin, d, tpu=False).astype(x.dtype) for x in xs)


def _rope_kernel_call(xs, positions, *, theta, inverse, interpret, block_s):
    b, s, _, d = xs[0].shape
    flat = [x.reshape(b, s, -1) for x in xs]
    lanes = sum(x.shape[-1] for x in flat)
    # VMEM: in + out blocks, double-buffered, of block_s rows x all heads' lanes; keep them ~<= 8 MiB.
    block_s = min(block_s, max(8, (_BLOCK_ELEMENTS // lanes) // 8 * 8), -(-s // 8) * 8)
    padded = -(-s // block_s) * block_s
    pad = padded - s
    freq = rope_inv_freq(d, theta)
    freq_row = jnp.concatenate([freq, freq])[None, :]
    if pad:
        flat = [jnp.pad(x, [(0, 0), (0, pad), (0, 0)]) for x in flat]
        positions = jnp.pad(positions, [(0, 0), (0, pad)])
    pos = positions.astype(jnp.int32)[:, :, None]
    tpu = on_tpu() and not interpret
    out = pl.pallas_call(
        functools.partial(_rope_kernel, n=len(xs), head_dim=d, inverse=inverse, tpu=tpu),
        grid=(b, padded // block_s),
        in_specs=[pl.BlockSpec((None, block_s, 1), lambda bi, si: (bi, si, 0)),
                  pl.BlockSpec(freq_row.shape, lambda bi, si: (0, 0))]
        + [pl.BlockSpec((None, block_s, x.shape[-1]), lambda bi, si: (bi, si, 0)) for x in flat],
        out_specs=[pl.BlockSpec((None, block_s, x.shape[-1]), lambda bi, si: (bi, si, 0)) for x in flat],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat],
        interpret=bool(interpret),
        name="rope_pallas",
    )(pos, freq_row, *flat)
    return tuple(o[:, :s].reshape(x.shape) for o, x in zip(out, xs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rope(xs, positions, theta, interpret, block_s):
    return _rope_call(xs, positions, theta, False, interpret, block_s)


def _rope_fwd(xs, positions, theta, interpret, block_s):
    return _rope_call(xs, positions, theta, False, interpret, block_s), positions


def _rope_bwd(theta, interpret, block_s, positions, cotangents):
    return _rope_call(cotangents, positions, theta, True, interpret, block_s), None


_rope.defvjp(_rope_fwd, _rope_bwd)


def _check(xs, positions):
    b, s, _, d = xs[0].shape
    for x in xs:
        if x.ndim != 4 or x.shape[:2] != (b, s) or x.shape[3] != d:
            raise AttentionConfigError(f"RoPE inputs must be [batch, seq, heads, head_dim] alike, got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise AttentionConfigError(f"RoPE input must be floating point, got {x.dtype}")
    if d % 2:
        raise AttentionConfigError(f"head_dim must be even for rotate-half RoPE, got {d}")
    if positions.shape != (b, s) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise AttentionConfigError(
            f"positions must be integer [batch, seq] = {(b, s)}, got {positions.dtype}{list(positions.shape)}")


def apply_rope_pallas(x, positions, *, theta, interpret=False, block_s=DEFAULT_BLOCK_S):
    """x [B, S, H, D] rotated at integer positions [B, S] (NeoX rotate-half, fp32 angles); same dtype."""
    _check((x,), positions)
    return _rope((x,), positions, float(theta), bool(interpret), int(block_s))[0]


def apply_rope_qk_pallas(q, k, positions, *, theta, interpret=False, block_s=DEFAULT_BLOCK_S):
    """q [B, S, Hq, D] and k [B, S, Hkv, D] rotated in one kernel pass; returns (q_rotated, k_rotated)."""
    _check((q, k), positions)
    return _rope((q, k), positions, float(theta), bool(interpret), int(block_s))
