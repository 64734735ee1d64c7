"""Pure-JAX rotary position embedding (NeoX "rotate-half"): the reference for the RoPE kernels.

`inv_freq = 1 / theta ** (arange(0, D, 2) / D)`, angles = position * inv_freq in float32 (rounding angles
to bf16 breaks phi-4 at theta 250k and 16K positions), `emb = concat(angles, angles)`, and
`x * cos(emb) + rotate_half(x) * sin(emb)` with `rotate_half(x) = concat(-x[D/2:], x[:D/2])`.
Positions are integers per token, so packed documents and decode offsets need nothing special.
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_inv_freq(head_dim: int, theta: float):
    """The head_dim / 2 rotation frequencies, float32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos and sin of the angles, each [B, S, head_dim / 2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_with(x, cos, sin):
    """Rotates x [B, S, H, D] by cos/sin [B, S, D/2] (float32 math, result in x.dtype)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def apply_rope_reference(x, positions, *, theta):
    """x [B, S, H, D], positions [B, S] int -> x rotated, same dtype."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    return rotate_with(x, cos, sin)
