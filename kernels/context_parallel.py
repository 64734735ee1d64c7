"""Context parallelism: causal attention with the sequence split over a mesh axis (all-gathered K/V).

Inside `shard_map`, every device of the context axis (size N) holds S/N query tokens and S/N key/value tokens.
`context_parallel_attention` all-gathers K and V (and the kv segment ids) over that axis, then attends its own
queries to the gathered keys with causal masking by *global token index*, so packed documents (segment ids)
that cross shard boundaries stay correct. RoPE is applied before the gather, by each token's own position,
so every key is rotated by its true position and positions never travel. Backward is autodiff through the
gather (its transpose is a reduce-scatter of dK/dV) around the per-shard attention's custom VJP.

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

Per-shard attention: queries and keys differ in length and the causal mask is offset by the shard's position
(a traced `q_start`). With implementation="pallas_tpu" it is the Mosaic TPU kernel
(`kernels.flash_attention_tpu` with `q_start` and `kv_segment_ids`: the offset is scalar-prefetched, causal
block skipping uses it); otherwise `kernels.attention_reference.attention_with_offset` (the blockwise XLA
flash attention that also serves `attention_blockwise`: causal block skipping, an LSE-saving custom VJP).
The Pallas GPU kernel and cuDNN have no query offset, so they fall back to the XLA one here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention_reference import DEFAULT_BLOCK_SIZE, attention_with_offset

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


# ----------------------------------------------------------------------------- the per-shard program

def context_parallel_attention(q, k, v, *, axis_name, axis_size, causal=True, segment_ids=None, sm_scale=None,
                               seq_layout="contiguous", block_size=DEFAULT_BLOCK_SIZE, implementation=None,
                               interpret=False):
    """Per-shard body (call inside `shard_map`): q [B, S/N, Hq, D] and k/v [B, S/N, Hkv, D] are this shard's tokens
    (already RoPE-rotated) in `seq_layout`; segment_ids [B, S/N] or None. Returns this shard's [B, S/N, Hq, D].

    implementation="pallas_tpu" attends with the Mosaic TPU kernel (its own block sizes; `interpret` as in
    `kernels.flash_attention`); any other value with the blockwise XLA attention (blocks of `block_size`)."""
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
    if implementation == "pallas_tpu":
        from kernels.flash_attention_tpu import flash_attention_tpu  # noqa: PLC0415 (Pallas TPU only when asked)

        def attend(q, q_start, q_seg):
            return flash_attention_tpu(q, k_all, v_all, causal=causal, segment_ids=q_seg, kv_segment_ids=seg_all,
                                       q_start=q_start, sm_scale=sm_scale, interpret=interpret)
    else:
        def attend(q, q_start, q_seg):
            return attention_with_offset(q, k_all, v_all, q_start=q_start, causal=causal, q_segment_ids=q_seg,
                                         kv_segment_ids=seg_all, sm_scale=sm_scale, block_size=block_size)
    outs = []
    for offset, length, chunk in _chunks_of_shard(seq_layout, n, local):
        if chunk is None:
            start = r * local
        else:
            start = (r if chunk == 0 else 2 * n - 1 - r) * length
        q_seg = None if segment_ids is None else segment_ids[:, offset:offset + length]
        outs.append(attend(q[:, offset:offset + length], start, q_seg))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
