"""Paged decode attention: a few new queries per sequence against a KV cache kept in fixed-size pages.

Contract: `paged_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scales=None, v_scales=None,
layer=None, sm_scale=None, implementation=None, interpret=False)`

- q [B, T, Hq, D]: the T newest tokens of each sequence (T = 1 for plain decoding, a prefill chunk otherwise);
- k_pages, v_pages [num_pages, page_size, Hkv, D], Hq % Hkv == 0: one layer's page pool, shared by all sequences
  (or every layer's, [layers, num_pages, page_size, Hkv, D], with `layer` saying which one to read: the gather
  then indexes the stacked pool directly, so no copy of a layer's whole pool is made);
- block_tables [B, W] int32: sequence b's token at position p lives in page block_tables[b, p // page_size], row
  p % page_size (entries past a sequence's last page may hold any valid page index; they are masked);
- lengths [B] int32: positions 0 .. lengths[b]-1 are valid and already hold the T new tokens' keys/values, so query
  t of sequence b sits at position lengths[b] - T + t and sees positions 0 .. lengths[b] - T + t (causal inside
  the new tokens), exactly as `decode_attention` over the sequence's pages laid end to end;
- k_scales, v_scales (only with int8 pages) [num_pages, Hkv, page_size] float32 (or [layers, ...]): an int8 cache
  holds round(x / s) for a key/value x of one token and kv head, s = max|x| / 127 over head_dim, so the key is
  k_pages[p, r, h] * k_scales[p, h, r] (and the value likewise); attention is computed over those dequantized
  keys/values. Each scale is constant along head_dim, so it factors out of both dots exactly: the k scale
  multiplies score column r (q . (s k) = s (q . k)) and the v scale multiplies probability column r before the
  probabilities-times-values dot (sum_r p_r (s_r v_r) = sum_r (p_r s_r) v_r). Both implementations apply them
  there, so no dequantized copy of the cache is made (int8 values are exact in bf16, so the dots read the int8
  tile cast to q's dtype);
- returns [B, T, Hq, D] in q's dtype.

`paged_attention_reference` is the XLA statement of that math: gather each sequence's pages through its block
table into a contiguous [B, W * page_size, Hkv, D] view and run `decode_attention_reference` on it (float32
softmax, positions at or past the length masked; for int8 pages with the gathered scales, which it applies after
the dots). It runs on CPU and GPU.

`paged_attention_pallas` is a Pallas TPU (Mosaic) kernel that reads the pages in place, with no gathered copy:
grid (batch, page); the block tables, lengths and layer index are scalar-prefetched into SMEM, so each step's K/V
block (one page of all kv heads: a (page_size, kv_heads, head_dim) block of the [layers, pages, page_size, kv_heads,
head_dim] pool, in the pool's own layout) is DMA'd straight from the page the table names. The block is read whole
because a view of the pool that would give one head's (page_size, head_dim) tile, [.., page_size, kv_heads *
head_dim], is not free on TPU: XLA tiles the two minor dimensions, so that reshape relays out every layer's pages
before each call (bench/paged_tpu_compile.py counted 4 whole-pool copies per layer). Pages past a sequence's length
repeat the last needed page's block index (so no new copy is made) and their compute is skipped. A step processes,
for each kv head in turn, its `group * T` queries against the head's [page_size, head_dim] slice of the block with
an online softmax (float32 running max, sum and accumulator per head in VMEM scratch), and the last page step
writes the normalized output of every head. With int8 pages the page's (Hkv, page_size) k and v scale tiles come
in with the same page index, the int8 block is widened to q's dtype in VMEM (Mosaic cannot take one head's slice
of an int8 block: its layout pass aborts), and head h's step uses row h of each scale tile as above. On TPU it needs head_dim a multiple of 128 and page_size a multiple of
8. `interpret=True` runs it in the TPU interpreter on a CPU (`interpret="hlo"`: as XLA ops, see
`kernels.pallas_compat.tpu_interpret_params`). `implementation=None` picks it on a TPU when the
shapes allow, the reference elsewhere.

On the CPU, the serving engine's per-layer path reads the pages in place with a native kernel instead
(`kernels.cpu_native.paged_attention`, C++ through XLA's FFI; same contract, float32 or bfloat16-bits pages).

`implementation="pallas_gpu"` is the GPU kernel (Pallas on Triton, reading the pages in place with a split-K
online softmax): `kernels.paged_attention_gpu`. It is opt-in: the GPU default stays the reference until a
hardware run is recorded (kernels.dispatch's HARDWARE_RUNS rule).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention_reference import MASK_VALUE
from kernels.decode_attention import DecodeAttentionError, decode_attention_reference
from kernels.paged_attention_gpu import paged_attention_gpu
from kernels.pallas_compat import on_tpu, tpu_interpret_params

PAGED_IMPLEMENTATIONS = ("xla", "pallas", "pallas_gpu")


def gather_pages(pages, block_tables, layer=None):
    """Pages [num_pages, page_size, H, D] (or [layers, ...] and a layer index) through block_tables [B, W] ->
    contiguous [B, W * page_size, H, D]."""
    b, w = block_tables.shape
    gathered = pages[block_tables] if layer is None else pages[layer, block_tables]   # [B, W, page_size, H, D]
    return gathered.reshape(b, w * pages.shape[-3], *pages.shape[-2:])


def gather_scales(scales, block_tables, layer=None):
    """Scales [num_pages, H, page_size] (or [layers, ...] and a layer index) through block_tables [B, W] ->
    contiguous [B, W * page_size, H]."""
    b, w = block_tables.shape
    gathered = scales[block_tables] if layer is None else scales[layer, block_tables]   # [B, W, H, page_size]
    return jnp.swapaxes(gathered, 2, 3).reshape(b, w * scales.shape[-1], scales.shape[-2])


def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, k_scales=None, v_scales=None,
                              layer=None, sm_scale=None):
    """Gathers the pages (and scales) and attends over them (see the module docstring)."""
    k = gather_pages(k_pages, block_tables, layer)
    v = gather_pages(v_pages, block_tables, layer)
    if k_scales is None:
        return decode_attention_reference(q, k, v, lengths, sm_scale=sm_scale)
    return decode_attention_reference(q, k, v, lengths, sm_scale=sm_scale,
                                      k_scale=gather_scales(k_scales, block_tables, layer),
                                      v_scale=gather_scales(v_scales, block_tables, layer))


def _check_scales(k_pages, v_pages, k_scales, v_scales):
    quantized = jnp.dtype(k_pages.dtype) == jnp.int8
    if jnp.dtype(v_pages.dtype) != jnp.dtype(k_pages.dtype):
        raise DecodeAttentionError(f"k_pages ({k_pages.dtype}) and v_pages ({v_pages.dtype}) differ in dtype")
    if not quantized:
        if k_scales is not None or v_scales is not None:
            raise DecodeAttentionError(f"k_scales/v_scales go only with int8 pages, got {k_pages.dtype} pages")
        return
    if k_scales is None or v_scales is None:
        raise DecodeAttentionError("int8 pages need k_scales and v_scales ([num_pages, kv_heads, page_size])")
    want = tuple(k_pages.shape[:-3]) + (k_pages.shape[-2], k_pages.shape[-3])
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if tuple(scales.shape) != want or not jnp.issubdtype(scales.dtype, jnp.floating):
            raise DecodeAttentionError(f"{name} must be float {list(want)} ([..., num_pages, kv_heads, page_size] "
                                       f"for pages {list(k_pages.shape)}), got {scales.dtype}{list(scales.shape)}")


def _check(q, k_pages, v_pages, block_tables, lengths, layer, k_scales=None, v_scales=None):
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
    _check_scales(k_pages, v_pages, k_scales, v_scales)


def _page_kernel(lengths_ref, tables_ref, layer_ref, q_ref, k_ref, v_ref, *refs, scale, t, page_size, quantized):
    """One (batch, page) step: online softmax of every kv head's query rows over one page of all kv heads. With
    `quantized`, refs starts with the page's k and v scale tiles [Hkv, page_size]."""
    ks_ref, vs_ref, o_ref, m_ref, l_ref, acc_ref = refs if quantized else (None, None, *refs)
    b, p = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    hkv, rows = q_ref.shape[0], q_ref.shape[1]

    @pl.when(p == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(p * page_size < length)
    def _compute():
        q_pos = length - t + jax.lax.broadcasted_iota(jnp.int32, (rows, page_size), 0) % t   # row r = g * T + t
        k_pos = p * page_size + jax.lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
        visible = k_pos <= q_pos
        if quantized:   # the int8 block is widened whole (Mosaic cannot slice one head out of an int8 tile)
            k_all, v_all = k_ref[...].astype(q_ref.dtype), v_ref[...].astype(q_ref.dtype)
        for h in range(hkv):                                             # kv head h: a [page_size, D] slice
            q = q_ref[h]
            if quantized:   # int8 is exact in q's dtype; the scales are applied after the dots
                k, v = k_all[:, h, :], v_all[:, h, :]
            else:
                k, v = k_ref[:, h, :], v_ref[:, h, :]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            if quantized:
                s = s * ks_ref[pl.ds(h, 1), :]                           # [1, page_size]: one scale per column
            s = jnp.where(visible, s, MASK_VALUE)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            probs = jnp.where(visible, jnp.exp(s - m_new), 0.0)
            corr = jnp.exp(m_prev - m_new)
            l_ref[h] = corr * l_ref[h] + probs.sum(axis=1, keepdims=True)
            weights = probs * vs_ref[pl.ds(h, 1), :] if quantized else probs
            acc_ref[h] = corr * acc_ref[h] + jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
            m_ref[h] = m_new

    @pl.when(p == pl.num_programs(1) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def paged_attention_pallas(q, k_pages, v_pages, block_tables, lengths, *, k_scales=None, v_scales=None, layer=None,
                           sm_scale=None, interpret=False):
    """The Pallas TPU kernel (see the module docstring); same contract as `paged_attention_reference`."""
    b, t, hq, d = q.shape
    quantized = k_scales is not None
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
        if quantized:
            k_scales, v_scales = k_scales[None], v_scales[None]
    page_size, hkv = k_pages.shape[2], k_pages.shape[3]
    group = hq // hkv
    scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    params = tpu_interpret_params(interpret)
    if not params and (d % 128 or page_size % 8):
        raise DecodeAttentionError(
            f"the Pallas paged attention kernel on TPU needs head_dim a multiple of 128 and page_size a multiple of "
            f"8 (its (page_size, head_dim) tiles of one kv head), got head_dim {d}, page_size {page_size}; use "
            "implementation='xla'")
    width = block_tables.shape[1]
    rows = group * t
    padded_rows = -(-rows // 8) * 8
    qr = q.reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, rows, d)
    if padded_rows != rows:   # zero rows pad the tile to a multiple of 8; they are dropped after the kernel
        qr = jnp.pad(qr, [(0, 0), (0, 0), (0, padded_rows - rows), (0, 0)])

    def page_index(bi, p, lengths_ref, tables_ref):
        last = jnp.maximum(lengths_ref[bi] - 1, 0) // page_size            # pages past it repeat the last one
        return tables_ref[bi, jnp.minimum(p, last)]

    def page_block(bi, p, lengths_ref, tables_ref, layer_ref):
        return layer_ref[0], page_index(bi, p, lengths_ref, tables_ref), 0, 0, 0

    def scale_block(bi, p, lengths_ref, tables_ref, layer_ref):      # all kv heads' scales of the page
        return layer_ref[0], page_index(bi, p, lengths_ref, tables_ref), 0, 0

    in_specs = [pl.BlockSpec((None, hkv, padded_rows, d), lambda bi, p, *_: (bi, 0, 0, 0)),
                pl.BlockSpec((None, None, page_size, hkv, d), page_block),
                pl.BlockSpec((None, None, page_size, hkv, d), page_block)]
    operands = [qr, k_pages, v_pages]
    if quantized:
        in_specs += [pl.BlockSpec((None, None, hkv, page_size), scale_block)] * 2
        operands += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    kernel = functools.partial(_page_kernel, scale=scale, t=t, page_size=page_size, quantized=quantized)

    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, width),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, hkv, padded_rows, d), lambda bi, p, *_: (bi, 0, 0, 0)),
            scratch_shapes=[pltpu.VMEM((hkv, padded_rows, 1), jnp.float32),
                            pltpu.VMEM((hkv, padded_rows, 1), jnp.float32),
                            pltpu.VMEM((hkv, padded_rows, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((b, hkv, padded_rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=params,
        name="paged_attention",
    )(lengths.astype(jnp.int32), block_tables.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1),
      *operands)
    out = out[:, :, :rows].reshape(b, hkv, group, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, hq, d)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scales=None, v_scales=None, layer=None,
                    sm_scale=None, implementation=None, interpret=False):
    """Paged decode attention (see the module docstring). `implementation`: None (the Pallas kernel on a TPU
    when head_dim % 128 == 0 and page_size % 8 == 0, or when `interpret`; else the reference), "xla", "pallas"
    (the TPU kernel) or "pallas_gpu" (the Triton kernel of `kernels.paged_attention_gpu`, float pages only; not a
    default yet); `interpret=True` runs a Pallas kernel on a CPU. int8 pages come with `k_scales` / `v_scales`."""
    _check(q, k_pages, v_pages, block_tables, lengths, layer, k_scales, v_scales)
    if implementation is None:
        fits = q.shape[-1] % 128 == 0 and k_pages.shape[-3] % 8 == 0
        implementation = "pallas" if (interpret or (on_tpu() and fits)) else "xla"
    if implementation not in PAGED_IMPLEMENTATIONS:
        raise DecodeAttentionError(
            f"unknown paged attention implementation {implementation!r}; choose one of {PAGED_IMPLEMENTATIONS}")
    if implementation == "pallas":
        return paged_attention_pallas(q, k_pages, v_pages, block_tables, lengths, k_scales=k_scales,
                                      v_scales=v_scales, layer=layer, sm_scale=sm_scale, interpret=interpret)
    if implementation == "pallas_gpu":
        if k_scales is not None:
            raise DecodeAttentionError("the GPU paged attention kernel reads float pages only; with an int8 KV cache "
                                       "use implementation='xla' or 'pallas'")
        return paged_attention_gpu(q, k_pages, v_pages, block_tables, lengths, layer=layer, sm_scale=sm_scale,
                                   interpret=interpret)
    return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, k_scales=k_scales,
                                     v_scales=v_scales, layer=layer, sm_scale=sm_scale)
