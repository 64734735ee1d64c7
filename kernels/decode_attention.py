"""Decode attention: a few new queries per sequence against a KV cache with per-sequence lengths.

Contract: `decode_attention(q, k_cache, v_cache, lengths, *, sm_scale=None, implementation=None,
interpret=False)`

- q [B, T, Hq, D]: the T newest tokens of each sequence (T = 1 for plain decoding);
- k_cache, v_cache [B, C, Hkv, D], Hq % Hkv == 0: cache slots 0 .. lengths[b]-1 are valid and already
  hold these T tokens' keys/values, so query t of sequence b sits at position lengths[b] - T + t and sees
  slots 0 .. lengths[b] - T + t (causal inside the new tokens);
- returns [B, T, Hq, D] in q's dtype.

`decode_attention_reference` below is the pure-JAX statement of that math (float32 softmax), the
reference the Pallas split-K ("flash decoding") kernels are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention_reference import MASK_VALUE


def decode_attention_reference(q, k_cache, v_cache, lengths, *, sm_scale=None):
    b, t, hq, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, hkv, group, d)
    scores = jnp.einsum("bthgd,bchd->bhgtc", qg, k_cache, preferred_element_type=jnp.float32) * scale
    q_pos = lengths[:, None] - t + jnp.arange(t)[None, :]                  # [B, T]
    visible = jnp.arange(c)[None, None, :] <= q_pos[:, :, None]           # [B, T, C]
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgtc,bchd->bthgd", probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def decode_attention(q, k_cache, v_cache, lengths, *, sm_scale=None, implementation=None, interpret=False):
    """Dispatches decode attention; see the module docstring. `implementation` None or "xla" = reference."""
    if implementation not in (None, "xla"):
        raise ValueError(f"decode attention implementation {implementation!r} is not available")
    return decode_attention_reference(q, k_cache, v_cache, lengths, sm_scale=sm_scale)
