"""The paged KV cache in the per-layer layout, for the serving engine on the CPU backend.

Why: `paged_cache.paged_extend` scans the layers over the stacked [layers, ...] weights and page pool, and
XLA:CPU copies every dynamic slice of a stacked weight before the matmul that reads it, so a memory-bound decode
step reads and writes each weight once more than it multiplies by it (the profile in BENCHMARKS.md's Decode
section; `per_layer_decode` says when the layout is used). Here each layer's weights are arrays of their
own with q/k/v and gate/up concatenated (`decoder.fuse_projections`: fewer, larger matmuls), every matrix a
`cpu_weights.MatrixWeight`: packed into panels for the native matmul (`kernels.cpu_native`) where it builds, else
2-D with the lm_head also transposed (XLA:CPU's dots copy or run slower otherwise), built once when the engine is
made (`per_layer_params`), and each layer's pages are an array of their own,
``[num_pages, page_size, kv_heads, head_dim]`` (`PagedKV` whose k and v are tuples, one array per layer). The
step is unrolled over the layers (`paged_extend_per_layer`), so nothing is sliced out of a stacked array.

Attention (`attend_layer_pages`): `kernels.cpu_native.paged_attention`, a native CPU kernel that reads each
sequence's pages in place through its block table (no gathered copy), for float32 pages and bfloat16 ones (their
uint16 bits as the pool keeps them) when the kernel is available and head_dim is a multiple of 16. Otherwise the
kernels' XLA path, which gathers the pages first: XLA:CPU fuses that gather into a copy of the pages in the
attention dots' order (keys [B, kv_heads, tokens, head_dim], values [B, kv_heads, head_dim, tokens]: the
`transpose_copy_fusion`s of BENCHMARKS.md's Decode profile), about 4 ms of a 13 ms 8-row step. Either way the pool
keeps the kernels' own token-major layout, ``[num_pages, page_size, kv_heads, head_dim]``. A 16-bit pool
(bfloat16, float16) is kept as its uint16 bits (`PageBits`): XLA:CPU widens a 16-bit float scatter's whole
operand to float32 and back, two copies of the layer's whole pool every step.

Same math and contract as `paged_extend` (the layer math is the model's own `decoder_block`); the engine tests
(tests/test_batching.py) run it on CPU against transformers' greedy answers and `generate`, and the mesh and
Pallas-kernel engine tests run the stacked `paged_extend`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

import kernels
from kernels import cpu_native
from phi4_jax.inference.cpu_weights import (
    cpu_layer,
    cpu_lm_head,
    cpu_lm_head_packed,
    native_matmul_available,
    panel_dtype,
    widened_lm_head,
)
from phi4_jax.inference.paged_cache import PagedKV, paged_implementation, paged_write_targets
from phi4_jax.model.config import Phi4Config
from phi4_jax.model.decoder import decoder_block, embed_tokens, fuse_projections, logits_from_hidden, rms_norm, rope

PER_LAYER_MAX_MEMORY_FRACTION = 0.25   # of physical memory: the most a second copy of the layer weights may take


def per_layer_decode(params, config: Phi4Config, shard) -> bool:
    """Whether the engine keeps the per-layer layout (see the module docstring): on the CPU backend, unsharded,
    with XLA's paged attention (not a Pallas kernel), plain array weights, and when its smallest form (`copy_bytes`
    without bfloat16 panels' matrices) takes at most `PER_LAYER_MAX_MEMORY_FRACTION` of physical memory. GPUs and
    TPUs fuse the slice into the matmul, and a sharded or large model keeps the stacked layout (no second copy of
    the weights)."""
    if shard is not None or config.kernel_interpret or paged_implementation(config) in ("pallas", "pallas_gpu"):
        return False
    layers = jax.tree.leaves(params["layers"])
    if not layers or not all(isinstance(w, jax.Array) for w in layers):
        return False
    if any(d.platform != "cpu" for w in layers for d in w.devices()):
        return False
    return _memory_allows(copy_bytes(params, native_matmul_available(), config.compute_dtype, keep_matrix=False))


def copy_bytes(params, native: bool, compute_dtype, keep_matrix: bool) -> int:
    """Bytes `per_layer_params` copies: each layer matrix as panels in `cpu_weights.panel_dtype` (and, for 16-bit
    panels with `keep_matrix`, its [K, N] copy too) or as a [K, N] copy, and the lm_head's panels, or its transposed
    copy (and a 16-bit one's float32 copy) without them."""
    total = 0
    for w in jax.tree.leaves(params["layers"]):
        dtype = panel_dtype(w.dtype, compute_dtype, native)
        if dtype is None:
            total += w.size * w.dtype.itemsize
        else:
            matrix = w.size * w.dtype.itemsize if keep_matrix and dtype.itemsize < 4 else 0
            total += w.size * dtype.itemsize + matrix
    head = params["lm_head"]
    if isinstance(head, jax.Array):
        dtype = panel_dtype(head.dtype, compute_dtype, native)
        if dtype is not None:
            total += head.size * dtype.itemsize
        else:
            total += head.size * head.dtype.itemsize + (head.size * 4 if widened_lm_head(head) else 0)
    return total


def _memory_allows(nbytes: int) -> bool:
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return nbytes <= PER_LAYER_MAX_MEMORY_FRACTION * physical


def per_layer_params(params, native: bool | None = None, compute_dtype=None, keep_matrix: bool | None = None):
    """The model's params with the stacked layers as a list of per-layer dicts, q/k/v and gate/up fused, in the
    CPU weight layout (`cpu_weights`), made in one compiled program (`_copies`): the layer weights copied (as
    native panels in `cpu_weights.panel_dtype` where `native`), and the lm_head packed into panels, or else
    transposed (and, for a 16-bit lm_head, widened to float32 for one-row products); the embedding, the final norm
    and the lm_head's own array are the model's, not copied. `native` defaults to
    `cpu_weights.native_matmul_available()`, `compute_dtype` (the products' dtype) to the layer weights' own, and
    `keep_matrix` (bfloat16 panels' [K, N] copies, for prefill) to whether that copy too fits the memory rule of
    `per_layer_decode`; without it prefill runs on the panels too."""
    native = native_matmul_available() if native is None else bool(native)
    if compute_dtype is None:
        compute_dtype = jax.tree.leaves(params["layers"])[0].dtype
    compute = jnp.dtype(compute_dtype).name
    if keep_matrix is None:
        keep_matrix = _memory_allows(copy_bytes(params, native, compute, keep_matrix=True))
    layers, head = _copies(params["layers"], params["lm_head"], native, compute, bool(keep_matrix))
    lm_head = params["lm_head"]
    if "panels" in head:
        lm_head = cpu_lm_head_packed(lm_head, head["panels"])
    elif "rows" in head:
        lm_head = cpu_lm_head(lm_head, head["rows"], head.get("float32"))
    return dict(params, layers=layers, lm_head=lm_head)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _copies(stacked_layers, lm_head, native: bool, compute_dtype: str, keep_matrix: bool):
    """(per-layer dicts in the CPU layout, the lm_head's copies: {"panels"} when packed natively, {"rows"} its
    transpose (and "float32" for a 16-bit one, `cpu_weights.cpu_lm_head`), {} for a weight object)."""
    n = jax.tree.leaves(stacked_layers)[0].shape[0]
    layers = [cpu_layer(fuse_projections(jax.tree.map(lambda w, i=i: w[i], stacked_layers)), native, compute_dtype,
                        keep_matrix) for i in range(n)]
    if not isinstance(lm_head, jax.Array):
        return layers, {}
    dtype = panel_dtype(lm_head.dtype, compute_dtype, native)
    if dtype is not None:
        return layers, {"panels": cpu_native.pack_matrix(lm_head.astype(dtype))}
    head = {"rows": jnp.transpose(lm_head)}
    if widened_lm_head(lm_head):
        head["float32"] = lm_head.astype(jnp.float32)
    return layers, head


@functools.partial(jax.tree_util.register_dataclass, data_fields=["bits"], meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class PageBits:
    """One layer's pages of a 16-bit float dtype (bfloat16, float16), kept as their uint16 bits. XLA:CPU widens a
    16-bit float scatter's whole operand to float32 and back (two copies of the layer's whole pool every step, the
    largest ops of a bfloat16 step), and materializes a bitcast around a scatter as a copy too; an integer scatter
    it does in place, and a bitcast read fuses into the attention's gather (`float_pages`, `write_rows`)."""
    bits: Any
    dtype: str


def float_pages(pages):
    """One layer's pages as floats: the array itself, or a `PageBits`' bits reinterpreted (fused into the gather)."""
    if isinstance(pages, PageBits):
        return jax.lax.bitcast_convert_type(pages.bits, jnp.dtype(pages.dtype))
    return pages


def write_rows(pages, page, row, values):
    """``pages.at[page, row].set(values)`` (targets past the pool dropped) for one layer's float or `PageBits`
    pages."""
    if isinstance(pages, PageBits):
        bits = jax.lax.bitcast_convert_type(values.astype(pages.dtype), jnp.uint16)
        return PageBits(pages.bits.at[page, row].set(bits, mode="drop"), pages.dtype)
    return pages.at[page, row].set(values.astype(pages.dtype), mode="drop")


def native_pages(pages):
    """The array `kernels.cpu_native.paged_attention` reads for one layer's pages (float32 pages, or a bfloat16
    `PageBits`' bits), or None when that kernel cannot take them (another dtype, head_dim not a multiple of 16, or
    the native kernel unavailable in this process)."""
    if isinstance(pages, PageBits):
        array = pages.bits if jnp.dtype(pages.dtype) == jnp.bfloat16 else None
    else:
        array = pages if jnp.dtype(pages.dtype) == jnp.float32 else None
    if array is None or array.shape[-1] % 16 or not cpu_native.available("phi4_cpu_paged_attention"):
        return None
    return array


def attend_layer_pages(q, k_pages, v_pages, block_tables, lengths):
    """`kernels.paged_attention` of q [B, T, Hq, D] over one layer's pages, in the pages' float dtype: the native
    CPU kernel reading the pages in place where `native_pages` allows (q rounded to the page dtype first, as the
    XLA path's dots read it), else the XLA path (a gather of every sequence's pages)."""
    k_native, v_native = native_pages(k_pages), native_pages(v_pages)
    dtype = float_pages(k_pages).dtype
    if k_native is not None and v_native is not None:
        out = cpu_native.paged_attention(q.astype(dtype), k_native, v_native, block_tables, lengths)
        return out.astype(dtype)
    return kernels.paged_attention(q.astype(dtype), float_pages(k_pages), float_pages(v_pages), block_tables,
                                   lengths, implementation="xla")


def init_pages_per_layer(config: Phi4Config, num_pages: int, page_size: int, dtype=None) -> PagedKV:
    """A zeroed page pool in the per-layer layout (see the module docstring): a tuple of one array per layer for
    keys and for values, `PageBits` for a 16-bit float dtype."""
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.compute_dtype)
    if dtype.itemsize == 2:
        layer = lambda: PageBits(jnp.zeros(shape, jnp.uint16), dtype.name)  # noqa: E731
    else:
        layer = lambda: jnp.zeros(shape, dtype)  # noqa: E731
    return PagedKV(tuple(layer() for _ in range(config.num_layers)), tuple(layer() for _ in range(config.num_layers)))


def paged_extend_per_layer(params, pages: PagedKV, tokens, start, n_new, block_tables, config: Phi4Config,
                           return_hidden: bool = False):
    """`paged_cache.paged_extend` for per-layer params (`per_layer_params`) and pages (`init_pages_per_layer`):
    returns (pages, float32 logits [B, vocab] at each sequence's last real new token), and with `return_hidden`
    every position's final-normed hidden state [B, T, E] after them."""
    num_pages, page_size = float_pages(pages.k[0]).shape[:2]
    positions, page, row = paged_write_targets(tokens, start, n_new, block_tables, page_size, num_pages)
    attend_lengths = start + tokens.shape[1]                                       # query t sits at start + t
    x = embed_tokens(params, tokens, config)
    ks, vs = [], []
    for layer, k_pages, v_pages in zip(params["layers"], pages.k, pages.v):
        def attend(q, k, v, k_pages=k_pages, v_pages=v_pages):
            q = rope(q, positions, config)
            k = rope(k, positions, config)
            k_pages, v_pages = write_rows(k_pages, page, row, k), write_rows(v_pages, page, row, v)
            return attend_layer_pages(q, k_pages, v_pages, block_tables, attend_lengths), (k_pages, v_pages)

        x, (k_pages, v_pages) = decoder_block(layer, x, config, attend)
        ks.append(k_pages)
        vs.append(v_pages)
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]   # [B, E]
    h = rms_norm(last, params["final_norm"], config.rms_norm_eps)
    logits = logits_from_hidden(params, h, config)
    if return_hidden:   # also every position's final-normed hidden state [B, T, E] (prompt logprobs)
        return PagedKV(tuple(ks), tuple(vs)), logits, rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return PagedKV(tuple(ks), tuple(vs)), logits
