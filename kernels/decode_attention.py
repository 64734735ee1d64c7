"""Decode attention: a few new queries per sequence against a KV cache with per-sequence lengths.

Contract: `decode_attention(q, k_cache, v_cache, lengths, *, sm_scale=None, implementation=None,
interpret=False)`

- q [B, T, Hq, D]: the T newest tokens of each sequence (T = 1 for plain decoding);
- k_cache, v_cache [B, C, Hkv, D], Hq % Hkv == 0: cache slots 0 .. lengths[b]-1 are valid and already
  hold these T tokens' keys/values, so query t of sequence b sits at position lengths[b] - T + t and sees
  slots 0 .. lengths[b] - T + t (causal inside the new tokens);
- returns [B, T, Hq, D] in q's dtype.

`decode_attention_reference` below is the pure-JAX statement of that math (float32 softmax), the
reference the Pallas split-K ("flash decoding") kernel is tested against.

`decode_attention_pallas` is that kernel. The cache length is cut into `num_splits` contiguous splits, one
grid step each (grid: batch, kv head, split), so a long cache keeps many cores busy even at batch 1. A step
processes all `group * T` queries of one kv head together (GQA: each K/V chunk is read once per kv head)
and walks its split in `block_k` chunks with an online softmax, stopping at the sequence's length (chunks past
it are never computed). Each split writes a partial output and its log-sum-exp; an LSE-weighted combine over
the splits (a few KiB, plain XLA) gives the result.

It is a backend-neutral `pl.pallas_call`, run on CPU with `interpret=True`. What a real backend needs:
TPU (Mosaic) - the K/V block is (split_len, head_dim) cut from the [B, C, Hkv * D] view of the cache, so
head_dim must be a multiple of 128 (phi-4: 128) and split_len of 8; `lengths` goes to SMEM (scalar reads).
Scalar prefetch of the lengths would also let skipped chunks avoid their DMA; here the whole split is copied
to VMEM and only the compute past the length is skipped. Mosaic compiles it for TPU v5e/v6e (see
tests/test_decode_attention.py and tests/test_flash_attention_tpu.py). GPU - a plain `pl.pallas_call` goes to
Mosaic GPU there, which does not take this kernel (its lengths copy is smaller than a warpgroup's TMA minimum,
and its windowed blocks overflow SMEM), and the Triton lowering would need power-of-two shapes; so when lowered
for a GPU (CUDA or ROCm) `decode_attention_pallas` is routed, by `jax.lax.platform_dependent` at lowering time,
to `decode_attention_reference` (XLA), even with implementation="pallas". tests/test_cuda_lowering.py checks
that an export for CUDA contains no Pallas call. `interpret=True` always runs the kernel (interpreted).
`implementation=None` picks the kernel on TPU (head_dim a multiple of 128) and the reference elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention_reference import MASK_VALUE
from kernels.dispatch import AttentionConfigError
from kernels.pallas_compat import on_tpu

DECODE_IMPLEMENTATIONS = ("xla", "pallas")
DEFAULT_BLOCK_K = 256
DEFAULT_NUM_SPLITS = 8


class DecodeAttentionError(AttentionConfigError):
    """Inputs or options that decode attention cannot handle."""


def decode_attention_reference(q, k_cache, v_cache, lengths, *, sm_scale=None, k_scale=None, v_scale=None):
    """The contract's math in XLA.

    An int8 cache comes with float scales k_scale, v_scale [B, C, Hkv]: key c of head h is
    k_cache[b, c, h] * k_scale[b, c, h]. A scale is constant along head_dim, so it is applied after the dots,
    exactly: the k scale to score column c, the v scale to probability column c (no dequantized cache is made;
    int8 values are exact in q's dtype, which the dots read them in)."""
    b, t, hq, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    quantized = k_scale is not None
    if quantized:
        k_cache, v_cache = k_cache.astype(q.dtype), v_cache.astype(q.dtype)

    def columns(s):   # scales [B, C, Hkv] -> [B, Hkv, 1, 1, C], against the scores [B, Hkv, group, T, C]
        return jnp.swapaxes(s, 1, 2).astype(jnp.float32)[:, :, None, None]

    qg = q.reshape(b, t, hkv, group, d)
    scores = jnp.einsum("bthgd,bchd->bhgtc", qg, k_cache, preferred_element_type=jnp.float32) * scale
    if quantized:
        scores = scores * columns(k_scale)
    q_pos = lengths[:, None] - t + jnp.arange(t)[None, :]                  # [B, T]
    visible = jnp.arange(c)[None, None, :] <= q_pos[:, :, None]           # [B, T, C]
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if quantized:
        probs = probs * columns(v_scale)
    out = jnp.einsum("bhgtc,bchd->bthgd", probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def _split_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, t, block_k, split_len):
    """One (batch, kv head, split) step: online softmax over the split's chunks below the length."""
    b, split = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    q = q_ref[...]                                                      # [R, D], row r = g * T + t
    rows = q.shape[0]
    start = split * split_len
    n_chunks = jnp.clip((length - start + block_k - 1) // block_k, 0, split_len // block_k)
    q_pos = length - t + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0) % t

    def chunk(c, carry):
        m, l, acc = carry
        k = k_ref[pl.ds(c * block_k, block_k), :]
        v = v_ref[pl.ds(c * block_k, block_k), :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        k_pos = start + c * block_k + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        visible = k_pos <= q_pos
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m - m_new)
        l = corr * l + p.sum(axis=1, keepdims=True)
        acc = corr * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_chunks, chunk, init)
    seen = l > 0
    o_ref[...] = acc / jnp.where(seen, l, 1.0)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _largest_divisor_at_most(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def decode_attention_pallas(q, k_cache, v_cache, lengths, *, sm_scale=None, interpret=False,
                            block_k=DEFAULT_BLOCK_K, num_splits=DEFAULT_NUM_SPLITS):
    """Split-K flash decoding as a Pallas kernel (see the module docstring); same contract as the reference.

    Lowered for a GPU it is the XLA reference instead (see the module docstring); on TPU and interpreted, the
    kernel."""
    kernel = functools.partial(_decode_attention_kernel, sm_scale=sm_scale, interpret=interpret, block_k=block_k,
                               num_splits=num_splits)
    if interpret:
        return kernel(q, k_cache, v_cache, lengths)
    reference = functools.partial(decode_attention_reference, sm_scale=sm_scale)
    return jax.lax.platform_dependent(q, k_cache, v_cache, lengths, cuda=reference, rocm=reference, default=kernel)


def _decode_attention_kernel(q, k_cache, v_cache, lengths, *, sm_scale, interpret, block_k, num_splits):
    b, t, hq, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    block_k = min(block_k, c)
    if c % block_k:
        raise DecodeAttentionError(
            f"cache length {c} must be a multiple of block_k {block_k} for the Pallas decode kernel")
    if d % 128 and not interpret and on_tpu():
        raise DecodeAttentionError(
            f"the Pallas decode kernel on TPU needs head_dim a multiple of 128 (it cuts (rows, head_dim) "
            f"tiles out of the [batch, cache, kv_heads * head_dim] cache), got {d}; use implementation='xla'")
    n_chunks = c // block_k
    n_splits = _largest_divisor_at_most(n_chunks, num_splits)
    split_len = (n_chunks // n_splits) * block_k
    rows = group * t
    padded_rows = -(-rows // 8) * 8
    # [B, T, Hkv, G, D] -> [B, Hkv, G * T, D]: the group's queries become the rows of one tile.
    qr = q.reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, rows, d)
    if padded_rows != rows:   # zero rows pad the tile to a multiple of 8; they are dropped after the kernel
        qr = jnp.pad(qr, [(0, 0), (0, 0), (0, padded_rows - rows), (0, 0)])
    k_flat = k_cache.reshape(b, c, hkv * d)    # free view: head h is lane block h of width D
    v_flat = v_cache.reshape(b, c, hkv * d)
    if on_tpu() and not interpret:
        # Mosaic reads scalars from SMEM only (a dynamic index into a VMEM vector does not compile).
        lengths_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    else:
        lengths_spec = pl.BlockSpec((b,), lambda bi, h, s: (0,))
    kernel = functools.partial(_split_kernel, scale=scale, t=t, block_k=block_k, split_len=split_len)
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(b, hkv, n_splits),
        in_specs=[
            lengths_spec,
            pl.BlockSpec((None, None, padded_rows, d), lambda bi, h, s: (bi, h, 0, 0)),
            pl.BlockSpec((None, split_len, d), lambda bi, h, s: (bi, s, h)),
            pl.BlockSpec((None, split_len, d), lambda bi, h, s: (bi, s, h)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, padded_rows, d), lambda bi, h, s: (bi, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, padded_rows, 1), lambda bi, h, s: (bi, h, s, 0, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, n_splits, padded_rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, n_splits, padded_rows, 1), jnp.float32)],
        interpret=bool(interpret),
        name="decode_attention_split_k",
    )(lengths.astype(jnp.int32), qr, k_flat, v_flat)
    # Combine the splits, each weighted by its share of the softmax mass (an empty split has lse -inf).
    lse_max = lse_part.max(axis=2, keepdims=True)
    weights = jnp.exp(lse_part - lse_max)
    out = (weights * o_part).sum(axis=2) / weights.sum(axis=2)            # [B, Hkv, R, D]
    out = out[:, :, :rows].reshape(b, hkv, group, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def _check(q, k_cache, v_cache, lengths):
    if q.ndim != 4 or k_cache.ndim != 4:
        raise DecodeAttentionError(
            f"q must be [batch, new_tokens, heads, head_dim] and the caches [batch, cache_len, kv_heads, "
            f"head_dim]; got q {q.shape}, k_cache {k_cache.shape}")
    if k_cache.shape != v_cache.shape:
        raise DecodeAttentionError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
    b, t, hq, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise DecodeAttentionError(f"q {q.shape} and cache {k_cache.shape} disagree in batch or head_dim")
    if hq % k_cache.shape[2]:
        raise DecodeAttentionError(
            f"query heads ({hq}) must be a multiple of cache kv heads ({k_cache.shape[2]})")
    if t > k_cache.shape[1]:
        raise DecodeAttentionError(f"{t} new tokens do not fit a cache of length {k_cache.shape[1]}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise DecodeAttentionError(f"lengths must be integer [batch] = ({b},), got {lengths.dtype}"
                                   f"{list(lengths.shape)}")


def decode_attention(q, k_cache, v_cache, lengths, *, sm_scale=None, implementation=None, interpret=False):
    """Decode attention (see the module docstring). `implementation`: None (the Pallas kernel on TPU, the
    reference elsewhere), "xla" (the reference) or "pallas" (the split-K kernel; `interpret=True` on CPU)."""
    _check(q, k_cache, v_cache, lengths)
    if implementation is None:
        implementation = "pallas" if (interpret or (on_tpu() and q.shape[-1] % 128 == 0)) else "xla"
    if implementation not in DECODE_IMPLEMENTATIONS:
        raise DecodeAttentionError(
            f"unknown decode attention implementation {implementation!r}; choose one of {DECODE_IMPLEMENTATIONS}")
    if implementation == "xla":
        return decode_attention_reference(q, k_cache, v_cache, lengths, sm_scale=sm_scale)
    return decode_attention_pallas(q, k_cache, v_cache, lengths, sm_scale=sm_scale, interpret=interpret)
