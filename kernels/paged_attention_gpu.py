"""Paged decode attention for GPUs: a Pallas kernel on the Triton backend that reads the pages in place.

Same contract as `kernels.paged_attention` (q [B, T, Hq, D]; a page pool [num_pages, page_size, Hkv, D] or the
stacked [layers, num_pages, page_size, Hkv, D] with `layer`; block_tables [B, W]; lengths [B]; query t of
sequence b at position lengths[b] - T + t, causal among the new tokens); returns [B, T, Hq, D] in q's dtype.

Why Triton and not Mosaic GPU (which the project's flash attention uses, kernels/flash_attention_gpu.py): decode
attention is bound by reading K/V, and one kv head has only group * T query rows (4 for phi-4 decoding one token),
far below the 64-row M of a Hopper `wgmma` tile, so Mosaic GPU's strengths (warpgroup MMA, TMA pipelines) buy
nothing here while tying the kernel to sm_90. Triton runs on every CUDA GPU JAX supports (Ampere, Hopper,
Blackwell), reads a page through a pointer the block table names (a gather of `pages_per_block` pages' rows
straight from HBM: no gathered copy of the pool, no scalar prefetch needed), and a backend-neutral
`pl.pallas_call` interprets on a CPU with `interpret=True`. `tl.dot` needs M, N, K >= 16 and every tensor a
power of two in size, so query rows are zero-padded to at least 16 and page blocks hold at least 16 tokens.

The kernel. Grid (batch, kv head x row block, split). A program owns `block_rows` query rows of one kv head (row
r = g * T + t: query head h * group + g, new token t; GQA: the head's K/V are read once for all its q heads) and
one split of the sequence's pages: the blocks of `pages_per_block` pages that hold positions below lengths[b] are
cut into `num_splits` contiguous runs (per sequence, from its own length, so short sequences spread over the
splits too), and the program walks its run with an online softmax (base 2, float32 running max, sum and
accumulator in registers). Each block's pages are named by the block table, loaded as [pages_per_block *
page_size, D] tiles of K and V, masked past each row's position (so past the length, and causally among the new
tokens). Splits write their unnormalized accumulator, running max and sum; an XLA combine (a few KiB) rescales and
sums them ("flash decoding"). Blocks past the length are never read; a split with nothing to do writes zeros.

Dtypes: bfloat16, float16 and float32 (pages and q in the same dtype; float32 dots in IEEE precision, not TF32);
anything else is refused with `DecodeAttentionError`. Shapes: head_dim and page_size powers of two, head_dim at
least 16 (Triton's block rules); others are refused with the reason.

Where it runs: lowered for a GPU (`require_gpu_target` follows the lowering target, so `jax.export(...,
platforms=["cuda"])` lowers it to Triton IR on a CPU host; jit for a CPU or TPU without `interpret=True` is
refused with a clear error). `interpret=True` runs the same kernel body in Pallas' interpreter on a CPU, which is
how tests/test_paged_attention_gpu.py checks it against a float64 NumPy oracle. Not yet compiled by Triton's PTX
pipeline nor run on a GPU; its block/split defaults are untuned.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.attention_reference import MASK_VALUE
from kernels.decode_attention import DecodeAttentionError
from kernels.pallas_compat import require_gpu_target

GPU_PAGED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MIN_DOT = 16                 # tl.dot's smallest M, N and K
DEFAULT_BLOCK_TOKENS = 64    # tokens (pages_per_block * page_size) per K/V block, when page_size allows
MAX_BLOCK_ROWS = 64          # query rows per program; more rows get more row blocks
TARGET_PROGRAMS = 264        # splits are added until batch x kv heads x row blocks x splits reaches this (2 per SM
                             # of an H100); untuned
LOG2E = math.log2(math.e)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_gpu_shapes(q, k_pages, v_pages):
    """Raises DecodeAttentionError naming the problem when the Triton kernel cannot take these inputs."""
    dtypes = {jnp.dtype(q.dtype), jnp.dtype(k_pages.dtype), jnp.dtype(v_pages.dtype)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in {jnp.dtype(d) for d in GPU_PAGED_DTYPES}:
        raise DecodeAttentionError(
            f"the Pallas GPU paged attention kernel takes q and pages of one dtype among bfloat16, float16, "
            f"float32; got q {jnp.dtype(q.dtype)}, k_pages {jnp.dtype(k_pages.dtype)}, v_pages "
            f"{jnp.dtype(v_pages.dtype)}; use implementation='xla'")
    d, page_size = q.shape[-1], k_pages.shape[-3]
    if not _pow2(d) or d < MIN_DOT or not _pow2(page_size):
        raise DecodeAttentionError(
            f"the Pallas GPU paged attention kernel needs head_dim a power of two >= {MIN_DOT} and page_size a "
            f"power of two (Triton's block shapes), got head_dim {d}, page_size {page_size}; use "
            "implementation='xla'")


def _kernel(tables_ref, lengths_ref, layer_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, t,
            page_size, pages_per_block, n_row_blocks, num_splits):
    """One (sequence, kv head x row block, split) program; see the module docstring."""
    b, hr, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head, row_block = hr // n_row_blocks, hr % n_row_blocks
    block_rows, d = q_ref.shape
    block_tokens = pages_per_block * page_size
    length = lengths_ref[b]
    layer = layer_ref[0]
    n_blocks = (length + block_tokens - 1) // block_tokens         # blocks holding a position below the length
    per_split = (n_blocks + num_splits - 1) // num_splits
    first = split * per_split
    last = jnp.minimum(first + per_split, n_blocks)

    q = q_ref[...]
    rows = row_block * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    q_pos = length - t + rows % t                                  # each row's position; it sees keys <= it

    def body(i, carry):
        acc, m, l = carry
        pages = tables_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = k_ref[layer, pages, :, head, :].reshape(block_tokens, d)
        v = v_ref[layer, pages, :, head, :].reshape(block_tokens, d)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * (scale * LOG2E)                                    # base-2 logits
        k_pos = i * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        visible = k_pos[None, :] <= q_pos[:, None]
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        probs = jnp.where(visible, jnp.exp2(s - m_new[:, None]), 0.0)
        corr = jnp.exp2(m - m_new)
        l = corr * l + probs.sum(axis=1)
        acc = corr[:, None] * acc + jax.lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                        preferred_element_type=jnp.float32)
        return acc, m_new, l

    init = (jnp.zeros((block_rows, d), jnp.float32), jnp.full((block_rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(first, last, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def paged_attention_gpu(q, k_pages, v_pages, block_tables, lengths, *, layer=None, sm_scale=None,
                        pages_per_block=None, num_splits=None, num_warps=4, num_stages=2, interpret=False):
    """The Pallas Triton kernel (see the module docstring); same contract as `paged_attention_reference`.

    pages_per_block: pages per K/V block (a power of two; default: DEFAULT_BLOCK_TOKENS tokens, at least 16).
    num_splits: splits of each sequence's pages (default: enough programs for TARGET_PROGRAMS, at most the
    table's blocks). Inputs are assumed checked by `kernels.paged_attention`'s shape checks; the GPU-specific
    limits are checked here.
    """
    check_gpu_shapes(q, k_pages, v_pages)
    b, t, hq, d = q.shape
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    page_size, hkv = k_pages.shape[2], k_pages.shape[3]
    group = hq // hkv
    scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    if pages_per_block is None:
        pages_per_block = max(DEFAULT_BLOCK_TOKENS, MIN_DOT) // page_size if page_size < DEFAULT_BLOCK_TOKENS else 1
    if not _pow2(pages_per_block) or pages_per_block * page_size < MIN_DOT:
        raise DecodeAttentionError(f"pages_per_block must be a power of two with pages_per_block * page_size >= "
                                   f"{MIN_DOT}, got {pages_per_block} (page_size {page_size})")

    rows = group * t
    block_rows = min(MAX_BLOCK_ROWS, max(MIN_DOT, _next_pow2(rows)))
    n_row_blocks = -(-rows // block_rows)
    width = block_tables.shape[1]
    table_blocks = -(-width // pages_per_block)
    if num_splits is None:
        num_splits = max(1, min(table_blocks, -(-TARGET_PROGRAMS // (b * hkv * n_row_blocks))))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise DecodeAttentionError(f"num_splits must be a positive integer, got {num_splits!r}")

    # Rows g * T + t per kv head, zero-padded to whole row blocks; tables padded (with page 0, masked) to blocks.
    qr = q.reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, rows, d)
    qr = jnp.pad(qr, [(0, 0), (0, 0), (0, n_row_blocks * block_rows - rows), (0, 0)])
    qr = qr.reshape(b, hkv * n_row_blocks, block_rows, d)
    tables = jnp.pad(block_tables.astype(jnp.int32), [(0, 0), (0, table_blocks * pages_per_block - width)])
    if not interpret:
        qr = require_gpu_target(qr, what="the Pallas GPU (Triton) paged attention kernel")

    grid = (b, hkv * n_row_blocks, num_splits)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731 (read through pointers)
    kernel = functools.partial(_kernel, scale=scale, t=t, page_size=page_size, pages_per_block=pages_per_block,
                               n_row_blocks=n_row_blocks, num_splits=num_splits)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, tables.shape[1]), lambda bi, hr, s: (bi, 0)),
            whole(lengths),
            pl.BlockSpec((1,), lambda *_: (0,)),
            pl.BlockSpec((None, None, block_rows, d), lambda bi, hr, s: (bi, hr, 0, 0)),
            whole(k_pages),
            whole(v_pages),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_rows, d), lambda bi, hr, s: (bi, hr, s, 0, 0)),
            pl.BlockSpec((None, None, None, block_rows), lambda bi, hr, s: (bi, hr, s, 0)),
            pl.BlockSpec((None, None, None, block_rows), lambda bi, hr, s: (bi, hr, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv * n_row_blocks, num_splits, block_rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv * n_row_blocks, num_splits, block_rows), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv * n_row_blocks, num_splits, block_rows), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=bool(interpret),
        name="paged_attention_gpu",
    )(tables, lengths.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1), qr, k_pages, v_pages)

    # Combine the splits (base-2 running maxima); rows that saw no key (padding) have l = 0 and give 0.
    m_all = m.max(axis=2, keepdims=True)
    weight = jnp.exp2(m - m_all)
    l_all = (weight * l).sum(axis=2)
    out = (weight[..., None] * acc).sum(axis=2) / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    out = out.reshape(b, hkv, n_row_blocks * block_rows, d)[:, :, :rows]
    return out.reshape(b, hkv, group, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)
