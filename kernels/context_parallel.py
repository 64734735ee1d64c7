"""Context parallelism: causal attention with the sequence split over a mesh axis (all-gathered K/V).

Inside `shard_map`, every device of the context axis (size N) holds S/N query tokens and S/N key/value tokens.
`context_parallel_attention` all-gathers K and V (and the kv segment ids) over that axis, then attends its own
queries to the gathered keys with causal masking by *global token index*, so packed documents (segment ids)
that cross shard boundaries stay correct. RoPE is applied before the gather, by each token's own position,
so every key is rotated by its true position and positions never travel. Backward is autodiff through the
gather (its transpose is a reduce-scatter of dK/dV) around `attention_with_offset`'s custom VJP.

Why all-gather K/V, not a ring, for phi-4 at 16K (40 q heads, 10 kv heads, head_dim 128, bf16; one sequence,
per layer; N = context-axis size):
- Q is [16384, 40, 128] = 160 MiB; K and V are 4x smaller (GQA 40:10): 40 MiB each, 80 MiB together.
- All-gather: each device receives (N-1)/N x 80 MiB of K/V in the forward (N=2: 40 MiB, N=4: 60 MiB) and
  reduce-scatters the same amount of dK/dV in the backward; gathered K/V live once, 80 MiB transient per
  layer (plus 160 MiB fp32 dK/dV in the backward), small next to the 160/N MiB of local Q and its output.
- Ring attention moves the same K/V bytes (N-1 ppermute steps of 80/N MiB) but needs N-1 steps of
  LSE bookkeeping and an exactly combined backward ring, and only helps when the K/V of the whole sequence
  does not fit; at 16K it does (80 MiB). Rotating Q instead of K/V would move 2x-4x more bytes.
- Attention FLOPs per layer (causal): 4 x S^2/2 x 40 x 128 ~= 2.7 TFLOP forward, ~2.7 ms at 1 PFLOP/s,
  against ~0.1-0.4 ms for 40-60 MiB over ICI/NVLink: the gather is cheap enough to run un-overlapped.
So all-gather K/V: simpler, exact (no cross-shard softmax merge), the same communication volume as a ring.

Load balance: with the sequence split contiguously (the layout the model's rules give: `seq` -> `context`),
shard r's causal work is proportional to 2r+1, so the last shard does (2N-1)/N^2 of the total instead of 1/N
(N=2: 3/4 vs 1/2, N=4: 7/16 vs 1/4). `seq_layout="zigzag"` fixes that: the sequence is cut into 2N chunks
and shard r holds chunks r and 2N-1-r, whose causal work sums to the same 2N+1 chunk-units on every shard.
The permutation is the data pipeline's job (`zigzag_order`; positions, segment ids and labels are permuted
the same way, and everything outside attention is per-token), because doing it inside the attention would
move Q and the output (4x the K/V bytes) through all-to-alls twice per layer. Until the pipeline permutes,
the model uses the contiguous layout (exact, unbalanced).

Per-shard kernel: queries and keys differ in length and the causal mask is offset by the shard's position, which
the Pallas kernels (equal-length q/kv, index-causal, no LSE output) do not support, so the per-shard attention
is `attention_with_offset`: blockwise flash attention in XLA with a traced query offset, causal block skipping
and an LSE-saving custom VJP. (A Pallas version needs a q-offset / kv-length in the kernels' masks.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention_reference import (
    DEFAULT_BLOCK_SIZE,
    _block_scores,
    _from_blocks,
    _segment_blocks,
    _to_blocks,
)

SEQ_LAYOUTS = ("contiguous", "zigzag")


# ----------------------------------------------------------------------------- layouts

def zigzag_order(seq_len: int, n_shards: int) -> np.ndarray:
    """Token order for the zigzag layout: x_zigzag = x[:, order]; shard r then holds chunks r and 2N-1-r."""
    if seq_len % (2 * n_shards):
        raise ValueError(f"zigzag layout needs seq_len ({seq_len}) divisible by 2 x context shards "
                         f"({2 * n_shards})")
    c = seq_len // (2 * n_shards)
    chunks = [i for r in range(n_shards) for i in (r, 2 * n_shards - 1 - r)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in chunks])


def zigzag_inverse(seq_len: int, n_shards: int) -> np.ndarray:
    """Inverse of `zigzag_order`: x = x_zigzag[:, inverse]."""
    return np.argsort(zigzag_order(seq_len, n_shards))


def _chunks_of_shard(layout: str, n: int, local_len: int):
    """[(offset into the local block, length, global-chunk index or None)] of one shard's query chunks."""
    if layout == "contiguous":
        return [(0, local_len, None)]
    c = local_len // 2
    return [(0, c, 0), (c, c, 1)]


# ----------------------------------------------------------------------------- attention with a query offset

def _cdiv(a, b):
    return -(-a // b)


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
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    nq, nk = _cdiv(sq, block), _cdiv(sk, block)
    qb = _to_blocks(q.reshape(b, sq, hkv, hq // hkv, d), nq, block)   # [nq, B, Hkv, G, blk, D]
    kb, vb = _to_blocks(k, nk, block), _to_blocks(v, nk, block)       # [nk, B, Hkv, blk, D]
    qs = None if q_seg is None else _segment_blocks(q_seg, nq, block, -1)
    ks = None if kv_seg is None else _segment_blocks(kv_seg, nk, block, -2)
    return qb, kb, vb, qs, ks, nq, nk


def _offset_forward(q, k, v, q_start, q_seg, kv_seg, causal, scale, block):
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


def _offset_backward(q, k, v, q_start, q_seg, kv_seg, out, lse_b, dout, causal, scale, block):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qb, kb, vb, qs, ks, nq, nk = _prepare(q, k, v, q_seg, kv_seg, block)
    dob = _to_blocks(dout.reshape(b, sq, hkv, hq // hkv, d), nq, block)
    ob = _to_blocks(out.reshape(b, sq, hkv, hq // hkv, d), nq, block)
    delta_b = jnp.sum(ob.astype(jnp.float32) * dob.astype(jnp.float32), -1)

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
def _offset_attention(q, k, v, q_start, q_seg, kv_seg, causal, scale, block):
    return _offset_forward(q, k, v, q_start, q_seg, kv_seg, causal, scale, block)[0]


def _offset_attention_fwd(q, k, v, q_start, q_seg, kv_seg, causal, scale, block):
    out, lse = _offset_forward(q, k, v, q_start, q_seg, kv_seg, causal, scale, block)
    return out, (q, k, v, q_start, q_seg, kv_seg, out, lse)


def _offset_attention_bwd(causal, scale, block, residuals, dout):
    q, k, v, q_start, q_seg, kv_seg, out, lse = residuals
    dq, dk, dv = _offset_backward(q, k, v, q_start, q_seg, kv_seg, out, lse, dout, causal, scale, block)
    return dq, dk, dv, None, None, None


_offset_attention.defvjp(_offset_attention_fwd, _offset_attention_bwd)


def attention_with_offset(q, k, v, *, q_start=0, causal=True, q_segment_ids=None, kv_segment_ids=None,
                          sm_scale=None, block_size=DEFAULT_BLOCK_SIZE):
    """Attention of q [B, Sq, Hq, D] (global token indices q_start .. q_start+Sq-1) to k/v [B, Sk, Hkv, D]
    (global indices 0 .. Sk-1). Causal: query i sees keys j <= i (global index); segment ids [B, Sq] / [B, Sk]
    (same segment only). `q_start` may be traced (e.g. from `lax.axis_index`). Differentiable in q, k, v;
    float32 softmax; kv blocks a query block cannot see are skipped, forward and backward.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    d = q.shape[-1]
    scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    block = int(min(block_size, _cdiv(max(q.shape[1], k.shape[1]), 8) * 8))
    q_start = jnp.asarray(q_start, jnp.int32)
    return _offset_attention(q, k, v, q_start, q_segment_ids, kv_segment_ids, bool(causal), scale, block)


# ----------------------------------------------------------------------------- the per-shard program

def context_parallel_attention(q, k, v, *, axis_name, axis_size, causal=True, segment_ids=None, sm_scale=None,
                               seq_layout="contiguous", block_size=DEFAULT_BLOCK_SIZE):
    """Per-shard body (call inside `shard_map`): q [B, S/N, Hq, D] and k/v [B, S/N, Hkv, D] are this shard's tokens
    (already RoPE-rotated) in `seq_layout`; segment_ids [B, S/N] or None. Returns this shard's [B, S/N, Hq, D]."""
    if seq_layout not in SEQ_LAYOUTS:
        raise ValueError(f"seq_layout must be one of {SEQ_LAYOUTS}, got {seq_layout!r}")
    n = axis_size
    local = q.shape[1]
    r = jax.lax.axis_index(axis_name)
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, axis=1, tiled=True)
    k_all, v_all = gather(k), gather(v)
    seg_all = None if segment_ids is None else gather(segment_ids)
    if seq_layout == "zigzag":
        # gathered order: shard 0's chunks (0, 2N-1), shard 1's (1, 2N-2), ... -> natural chunk order
        c = local // 2
        slot = [2 * i if i < n else 2 * (2 * n - 1 - i) + 1 for i in range(2 * n)]
        natural = np.concatenate([np.arange(s * c, (s + 1) * c) for s in slot])
        k_all, v_all = k_all[:, natural], v_all[:, natural]
        seg_all = None if seg_all is None else seg_all[:, natural]
    outs = []
    for offset, length, chunk in _chunks_of_shard(seq_layout, n, local):
        if chunk is None:
            start = r * local
        else:
            start = (r if chunk == 0 else 2 * n - 1 - r) * length
        q_seg = None if segment_ids is None else segment_ids[:, offset:offset + length]
        outs.append(attention_with_offset(
            q[:, offset:offset + length], k_all, v_all, q_start=start, causal=causal, q_segment_ids=q_seg,
            kv_segment_ids=seg_all, sm_scale=sm_scale, block_size=block_size))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
