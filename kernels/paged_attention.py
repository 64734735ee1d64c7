"""Paged decode attention: a few new queries per sequence against a KV cache kept in fixed-size pages.

Contract: `paged_attention(q, k_pages, v_pages, block_tables, lengths, *, layer=None, sm_scale=None,
implementation=None)`

- q [B, T, Hq, D]: the T newest tokens of each sequence (T = 1 for plain decoding, a prefill chunk otherwise);
- k_pages, v_pages [num_pages, page_size, Hkv, D], Hq % Hkv == 0: one layer's page pool, shared by all sequences
  (or every layer's, [layers, num_pages, page_size, Hkv, D], with `layer` saying which one to read: the gather
  then indexes the stacked pool directly, so no copy of a layer's whole pool is made);
- block_tables [B, W] int32: sequence b's token at position p lives in page block_tables[b, p // page_size], row
  p % page_size (entries past a sequence's last page may hold any valid page index; they are masked);
- lengths [B] int32: positions 0 .. lengths[b]-1 are valid and already hold the T new tokens' keys/values, so query
  t of sequence b sits at position lengths[b] - T + t and sees positions 0 .. lengths[b] - T + t (causal inside
  the new tokens), exactly as `decode_attention` over the sequence's pages laid end to end;
- returns [B, T, Hq, D] in q's dtype.

`paged_attention_reference` is the XLA statement of that math: gather each sequence's pages through its block
table into a contiguous [B, W * page_size, Hkv, D] view and run `decode_attention_reference` on it (float32
softmax, positions at or past the length masked). It is what runs on every backend today; a Pallas kernel that
reads the pages in place (no gathered copy) is future work.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.decode_attention import DecodeAttentionError, decode_attention_reference

PAGED_IMPLEMENTATIONS = ("xla",)


def gather_pages(pages, block_tables, layer=None):
    """Pages [num_pages, page_size, H, D] (or [layers, ...] and a layer index) through block_tables [B, W] ->
    contiguous [B, W * page_size, H, D]."""
    b, w = block_tables.shape
    gathered = pages[block_tables] if layer is None else pages[layer, block_tables]   # [B, W, page_size, H, D]
    return gathered.reshape(b, w * pages.shape[-3], *pages.shape[-2:])


def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, layer=None, sm_scale=None):
    """Gathers the pages and attends over them (see the module docstring)."""
    k = gather_pages(k_pages, block_tables, layer)
    v = gather_pages(v_pages, block_tables, layer)
    return decode_attention_reference(q, k, v, lengths, sm_scale=sm_scale)


def _check(q, k_pages, v_pages, block_tables, lengths, layer):
    kshape, vshape = tuple(k_pages.shape), tuple(v_pages.shape)
    if layer is not None:
        if len(kshape) != 5:
            raise DecodeAttentionError(f"with `layer` the pages must be [layers, num_pages, page_size, kv_heads, "
                                       f"head_dim]; got k_pages {kshape}")
        kshape, vshape = kshape[1:], vshape[1:]
    if q.ndim != 4 or len(kshape) != 4:
        raise DecodeAttentionError(
            f"q must be [batch, new_tokens, heads, head_dim] and the pages [num_pages, page_size, kv_heads, "
            f"head_dim]; got q {q.shape}, k_pages {kshape}")
    if kshape != vshape:
        raise DecodeAttentionError(f"k_pages {kshape} and v_pages {vshape} differ")
    b, t, hq, d = q.shape
    if kshape[3] != d:
        raise DecodeAttentionError(f"q {q.shape} and pages {kshape} disagree in head_dim")
    if hq % kshape[2]:
        raise DecodeAttentionError(f"query heads ({hq}) must be a multiple of kv heads ({kshape[2]})")
    if block_tables.ndim != 2 or block_tables.shape[0] != b or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise DecodeAttentionError(f"block_tables must be integer [batch={b}, pages_per_sequence], got "
                                   f"{block_tables.dtype}{list(block_tables.shape)}")
    if t > block_tables.shape[1] * kshape[1]:
        raise DecodeAttentionError(f"{t} new tokens do not fit {block_tables.shape[1]} pages of {kshape[1]} tokens")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise DecodeAttentionError(f"lengths must be integer [batch] = ({b},), got {lengths.dtype}"
                                   f"{list(lengths.shape)}")


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, layer=None, sm_scale=None, implementation=None):
    """Paged decode attention (see the module docstring). `implementation`: None or "xla" (the reference)."""
    _check(q, k_pages, v_pages, block_tables, lengths, layer)
    if implementation not in (None, *PAGED_IMPLEMENTATIONS):
        raise DecodeAttentionError(
            f"unknown paged attention implementation {implementation!r}; choose one of {PAGED_IMPLEMENTATIONS}")
    return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, layer=layer, sm_scale=sm_scale)
