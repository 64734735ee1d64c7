"""Pure-JAX attention: the reference that every attention kernel is tested against.

Implementations of the same math:

- `attention_naive`: materializes the full [S, S] score matrix. Only for short test inputs.
- `attention_with_offset`: flash-attention in plain XLA. Queries and keys are cut into blocks; an online
  softmax runs over key blocks, fully masked causal blocks are skipped, and nothing larger than
  [block, block] scores per head is ever live. The backward pass is a `jax.custom_vjp` that recomputes the
  probabilities from the saved log-sum-exp (FlashAttention-2 style), so a 16K-token sequence neither
  stores nor differentiates through an S x S matrix. The queries may be a chunk of the key sequence that
  starts at a (traced) global index `q_start`, with their own segment ids: the per-shard attention of
  context parallelism (`kernels.context_parallel`).
- `attention_blockwise`: the same with queries and keys one sequence (q_start 0). This is the `"xla"`
  implementation behind `kernels.flash_attention` and the one the model uses on CPU.

Layout: q [B, S, Hq, D], k and v [B, S, Hkv, D], Hq % Hkv == 0 (query head h uses kv head h // (Hq/Hkv)).
Masking: with `causal`, query i sees keys j <= i (token order); with `segment_ids` [B, S], a query sees
only keys of its own segment. Segment 0 marks padding: padding tokens attend among themselves, so their
outputs are finite but meaningless. Softmax and all accumulation are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_BLOCK_SIZE = 512
# Finite "minus infinity": a fully masked row then averages over masked keys instead of producing NaN,
# and any later unmasked key erases that contribution (exp(MASK - m) == 0).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _mask(q_pos, k_pos, q_seg, k_seg, causal, kv_len):
    """Boolean mask [..., Sq, Sk] for query positions q_pos [Sq] and key positions k_pos [Sk]."""
    mask = (k_pos < kv_len)[None, :]
    if causal:
        mask = mask & (q_pos[:, None] >= k_pos[None, :])
    mask = mask[None]  # batch axis
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask  # [B or 1, Sq, Sk]


def attention_naive(q, k, v, *, causal=True, segment_ids=None, sm_scale=None):
    """Materialized softmax(q k^T) v. The simplest correct statement of the math; O(S^2) memory."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, s, hkv, group, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    pos = jnp.arange(s)
    mask = _mask(pos, pos, segment_ids, segment_ids, causal, s)  # [B|1, S, S]
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, hq, d).astype(q.dtype)


# ----------------------------------------------------------------------------- blockwise (flash) in XLA

def _to_blocks(x, n_blocks, block):
    """[B, S, H, ...] -> [n_blocks, B, H, ..., block, D] with S padded to n_blocks * block."""
    b, s = x.shape[:2]
    pad = n_blocks * block - s
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, n_blocks, block, *x.shape[2:])
    # -> [nb, B, heads..., block, D]
    perm = (1, 0) + tuple(range(3, x.ndim - 1)) + (2, x.ndim - 1)
    return x.transpose(perm)


def _from_blocks(x, s):
    """Inverse of `_to_blocks`: [nb, B, heads..., block, D] -> [B, S, heads..., D]."""
    nb, b = x.shape[:2]
    block, d = x.shape[-2:]
    heads = x.shape[2:-2]
    perm = (1, 0, x.ndim - 2) + tuple(range(2, x.ndim - 2)) + (x.ndim - 1,)
    x = x.transpose(perm).reshape(b, nb * block, *heads, d)
    return x[:, :s]


def _segment_blocks(segment_ids, n_blocks, block, fill):
    b, s = segment_ids.shape
    pad = n_blocks * block - s
    seg = jnp.pad(segment_ids, [(0, 0), (0, pad)], constant_values=fill) if pad else segment_ids
    return seg.reshape(b, n_blocks, block).transpose(1, 0, 2)  # [nb, B, block]


def _block_scores(qb, kb, scale, q_pos, k_pos, q_seg, k_seg, causal, kv_len):
    """Scores of one (q block, kv block) pair, masked: [B, Hkv, G, bq, bk] float32."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, preferred_element_type=jnp.float32) * scale
    mask = _mask(q_pos, k_pos, q_seg, k_seg, causal, kv_len)  # [B|1, bq, bk]
    return jnp.where(mask[:, None, None], s, MASK_VALUE)


def _kv_hi(q_start, i, block, nk, causal):
    """One past the last kv block that q block i (global rows q_start + i*block ...) can see."""
    if not causal:
        return nk
    return jnp.clip((q_start + (i + 1) * block - 1) // block + 1, 0, nk)


def _q_lo(q_start, j, block, nq, causal):
    """First q block that can see kv block j."""
    if not causal:
        return 0
    return jnp.clip((j * block - q_start) // block, 0, nq)


def _prepare(q, k, v, q_seg, kv_seg, block):
    """Blocked operands: q [nq, B, Hkv, G, blk, D], k/v [nk, B, Hkv, blk, D], segment ids [n, B, blk]."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    nq, nk = -(-sq // block), -(-sk // block)
    qb = _to_blocks(q.reshape(b, sq, hkv, hq // hkv, d), nq, block)
    kb, vb = _to_blocks(k, nk, block), _to_blocks(v, nk, block)
    # Padding rows get segment ids no real token has (and padded keys are masked by position anyway).
    qs = None if q_seg is None else _segment_blocks(q_seg, nq, block, -1)
    ks = None if kv_seg is None else _segment_blocks(kv_seg, nk, block, -2)
    return qb, kb, vb, qs, ks, nq, nk


def _forward(q, k, v, q_start, q_seg, kv_seg, causal, scale, block):
    """Output [B, Sq, Hq, D] and the blocked log-sum-exp [nq, B, Hkv, G, blk] float32."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    qb, kb, vb, qs, ks, nq, nk = _prepare(q, k, v, q_seg, kv_seg, block)

    def q_block(i):
        q_i = qb[i]
        q_pos = q_start + i * block + jnp.arange(block)
        q_seg_i = None if qs is None else qs[i]

        def kv_step(j, carry):
            m, l, acc = carry
            k_pos = j * block + jnp.arange(block)
            sc = _block_scores(q_i, kb[j], scale, q_pos, k_pos, q_seg_i, None if ks is None else ks[j],
                               causal, sk)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.exp(sc - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
            return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

        shape = q_i.shape[:-1]
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(q_i.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _kv_hi(q_start, i, block, nk, causal), kv_step, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out_b, lse_b = jax.lax.map(q_block, jnp.arange(nq))
    return _from_blocks(out_b, sq).reshape(b, sq, hq, d), lse_b


def _backward(q, k, v, q_start, q_seg, kv_seg, out, lse_b, dout, causal, scale, block):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qb, kb, vb, qs, ks, nq, nk = _prepare(q, k, v, q_seg, kv_seg, block)
    dob = _to_blocks(dout.reshape(b, sq, hkv, hq // hkv, d), nq, block)
    ob = _to_blocks(out.reshape(b, sq, hkv, hq // hkv, d), nq, block)
    delta_b = jnp.sum(ob.astype(jnp.float32) * dob.astype(jnp.float32), -1)  # [nq, B, Hkv, G, blk]

    def probs_and_dscores(i, j):
        q_pos = q_start + i * block + jnp.arange(block)
        k_pos = j * block + jnp.arange(block)
        sc = _block_scores(qb[i], kb[j], scale, q_pos, k_pos, None if qs is None else qs[i],
                           None if ks is None else ks[j], causal, sk)
        p = jnp.exp(sc - lse_b[i][..., None])
        dp = jnp.einsum("bhgqd,bhkd->bhgqk", dob[i], vb[j], preferred_element_type=jnp.float32)
        return p, p * (dp - delta_b[i][..., None])

    def dq_block(i):
        def step(j, dq):
            _, ds = probs_and_dscores(i, j)
            return dq + jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(kb.dtype), kb[j],
                                   preferred_element_type=jnp.float32)
        hi = _kv_hi(q_start, i, block, nk, causal)
        return jax.lax.fori_loop(0, hi, step, jnp.zeros(qb.shape[1:], jnp.float32)) * scale

    def dkv_block(j):
        def step(i, carry):
            dk, dv = carry
            p, ds = probs_and_dscores(i, j)
            dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(dob.dtype), dob[i],
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(qb.dtype), qb[i],
                                 preferred_element_type=jnp.float32)
            return dk, dv
        zeros = jnp.zeros(kb.shape[1:], jnp.float32)
        dk, dv = jax.lax.fori_loop(_q_lo(q_start, j, block, nq, causal), nq, step, (zeros, zeros))
        return dk * scale, dv

    dq = _from_blocks(jax.lax.map(dq_block, jnp.arange(nq)), sq).reshape(b, sq, hq, d)
    dk_b, dv_b = jax.lax.map(dkv_block, jnp.arange(nk))
    return dq.astype(q.dtype), _from_blocks(dk_b, sk).astype(k.dtype), _from_blocks(dv_b, sk).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, q_start, q_seg, kv_seg, causal, scale, block):
    return _forward(q, k, v, q_start, q_seg, kv_seg, causal, scale, block)[0]


def _flash_fwd(q, k, v, q_start, q_seg, kv_seg, causal, scale, block):
    out, lse = _forward(q, k, v, q_start, q_seg, kv_seg, causal, scale, block)
    return out, (q, k, v, q_start, q_seg, kv_seg, out, lse)


def _flash_bwd(causal, scale, block, residuals, dout):
    q, k, v, q_start, q_seg, kv_seg, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_start, q_seg, kv_seg, out, lse, dout, causal, scale, block)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _static_args(q, k, sm_scale, block_size):
    """(scale, block): the block shrinks to the longer sequence (rounded up to 8) when that is shorter."""
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    return scale, int(min(block_size, -(-max(q.shape[1], k.shape[1]) // 8) * 8))


def attention_with_offset(q, k, v, *, q_start=0, causal=True, q_segment_ids=None, kv_segment_ids=None,
                          sm_scale=None, block_size=DEFAULT_BLOCK_SIZE):
    """Attention of q [B, Sq, Hq, D] (global token indices q_start .. q_start+Sq-1) to k/v [B, Sk, Hkv, D]
    (global indices 0 .. Sk-1). Causal: query i sees keys j <= i (global index); segment ids [B, Sq] / [B, Sk]
    (same segment only). `q_start` may be traced (e.g. from `lax.axis_index`). Differentiable in q, k, v;
    float32 softmax; kv blocks a query block cannot see are skipped, forward and backward.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    scale, block = _static_args(q, k, sm_scale, block_size)
    q_start = jnp.asarray(q_start, jnp.int32)
    return _flash(q, k, v, q_start, q_segment_ids, kv_segment_ids, bool(causal), scale, block)


def attention_blockwise(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        block_size=DEFAULT_BLOCK_SIZE):
    """Flash attention in plain XLA with an LSE-saving custom VJP (see module docstring): q, k, v are the same
    sequence, i.e. `attention_with_offset` with q_start=0 and the same segment ids for queries and keys."""
    return attention_with_offset(q, k, v, q_start=0, causal=causal, q_segment_ids=segment_ids,
                                 kv_segment_ids=segment_ids, sm_scale=sm_scale, block_size=block_size)


def attention_forward_with_lse(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                               block_size=DEFAULT_BLOCK_SIZE):
    """Forward pass that also returns the log-sum-exp [B, Hq, S] (float32): the kernels' reference."""
    b, s, hq, _ = q.shape
    scale, block = _static_args(q, k, sm_scale, block_size)
    out, lse_b = _forward(q, k, v, 0, segment_ids, segment_ids, bool(causal), scale, block)
    lse = _from_blocks(lse_b[..., None], s)[..., 0]  # [B, S, Hkv, G]
    return out, lse.reshape(b, s, hq).transpose(0, 2, 1)
