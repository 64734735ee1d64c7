"""Flash attention for TPU as Mosaic TPU Pallas kernels: forward, backward (dq, dk, dv), GQA, causal, segments, RoPE.

`flash_attention_tpu(q, k, v, *, causal, segment_ids, sm_scale, interpret, block_q, block_k, rope, q_start,
kv_segment_ids)` takes the project layout q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] and returns [B, Sq, Hq, D].
Usually q and k/v are one sequence (Sq == Sk); under context parallelism q is a chunk of the (all-gathered) key
sequence that starts at key index `q_start`, with its own segment ids. Inside, the wrapper moves heads before the
sequence ([B, H, S, D], so every tile is a (rows, head_dim) slab that satisfies Mosaic's (8, 128) tiling) and
pads Sq and Sk up to their block grids. Three kernels, joined by a `jax.custom_vjp` that saves the log-sum-exp:

- forward: grid (B, Hq, q blocks, kv blocks), online softmax in VMEM scratch, writes out and LSE;
- dq: grid (B, Hq, q blocks, kv blocks), recomputes probabilities from the LSE;
- dk/dv: grid (B, Hkv, kv blocks, group, q blocks): one kv head accumulates over all of its `group` q heads, so
  the GQA reduction happens in VMEM and K/V are never repeated in memory (query head h reads kv head h // group
  through the index maps). Its tiles are transposed ([block_k, block_q]), so the per-query LSE and delta
  arrive as cheap (8, block_q) row slabs and no score tile needs a transpose.

Causal by global index: query row r is token q_start + r, key column c is token c, and q sees k iff
q_start + r >= c. `q_start` is a traced int32 scalar, prefetched into SMEM (`PrefetchScalarGridSpec`), so one
compiled kernel serves every context shard (`lax.axis_index` x chunk length). A (q block, kv block) pair
entirely above the (offset) diagonal is skipped with `pl.when`, and its index map points at a block that is
needed anyway, so no DMA is issued for it. Keys past the true length are masked.
Segment ids follow `kernels.attention_reference`: q attends to k iff same segment (and causal); padding (0)
attends among itself. Softmax and accumulation are float32; inputs float32 or bfloat16.

Fused RoPE (`rope=(positions, theta)`): q and k tiles are rotated right after loading (NeoX rotate-half, fp32
angles from integer positions), in the forward and both backward kernels, and dq/dk are rotated back by
-angle before they are written, so gradients are with respect to the un-rotated q and k. Rotated q/k never
exist in HBM. Fused RoPE needs q and k/v to be one sequence (no q_start): context parallelism rotates q and k
before the all-gather and calls the kernel without it.

Constraints imposed (checked, AttentionConfigError otherwise): head_dim a multiple of 64 (128 for fused RoPE,
whose rotate-half is a lane roll of a full 128-lane vreg), block_k and block_q multiples of 128 (the lane
axes of the forward/dq and the dk/dv score tiles). Verified so far: numerics in the TPU interpreter on CPU, and a full
Mosaic compile (libtpu's deviceless AOT path) for TPU v4, v5e, v5p and v6e at phi-4 shapes (40/10 heads, D 128,
16K, bf16) with the 512/512 defaults inside the default scoped VMEM, the query-offset form (an 8K query chunk
at a traced q_start against 16K keys) included, and the offset form inside shard_map over a context axis on v5p. Not yet run on TPU hardware, so the block
defaults are untuned.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention_reference import MASK_VALUE
from kernels.dispatch import AttentionConfigError
from kernels.pallas_compat import rope_tile, tpu_interpret_params
from kernels.rope_reference import rope_inv_freq

LANES = 128
SUBLANES = 8
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one attention call (hashable: it is a custom_vjp nondiff argument).

    Queries are rows q_start .. q_start + q_len - 1 of the key sequence (global index), keys 0 .. kv_len - 1;
    q_start is not static: the kernels read it from SMEM (scalar prefetch), and the methods below take it.
    """

    causal: bool
    scale: float
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    group: int
    has_segments: bool
    rope_theta: float | None
    interpret: Any

    @property
    def q_padded(self):
        return _round_up(self.q_len, self.block_q)

    @property
    def kv_padded(self):
        return _round_up(self.kv_len, self.block_k)

    @property
    def n_q(self):
        return self.q_padded // self.block_q

    @property
    def n_k(self):
        return self.kv_padded // self.block_k

    def last_q_row(self, i, q_start):
        """Global index of the last real query row of q block i."""
        return q_start + jnp.minimum((i + 1) * self.block_q, self.q_len) - 1

    def last_kv_block(self, i, q_start):
        """Last kv block that q block i needs (traced)."""
        last = (self.kv_len - 1) // self.block_k
        if self.causal:
            last = jnp.minimum(last, _div(self.last_q_row(i, q_start), self.block_k))
        return last

    def first_q_block(self, j, q_start):
        """First q block that needs kv block j (the last q block when none does)."""
        if not self.causal:
            return 0
        return jnp.minimum(_div(jnp.maximum(j * self.block_k - q_start, 0), self.block_q), self.n_q - 1)

    def block_needed(self, i, j, q_start):
        """Whether the (q block i, kv block j) pair has any unmasked-by-position entry."""
        needed = j * self.block_k < self.kv_len
        if self.causal:
            needed = jnp.logical_and(needed, j * self.block_k <= self.last_q_row(i, q_start))
        return needed


# ----------------------------------------------------------------------------- in-kernel helpers

def _div(a, b):
    """a // b for non-negative ints: a plain truncating division (no sign fix-up) when a is traced."""
    if isinstance(a, int):
        return a // b
    return jax.lax.div(a, jnp.asarray(b, a.dtype))


def _nt_dot(a, b):
    """a [m, d] @ b[n, d]^T -> [m, n] float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(cfg: _Config, i, j, q_start, refs, *, transposed=False):
    """Boolean mask of the (q block i, kv block j) tile, or None when nothing is masked.

    [block_q, block_k] (q on sublanes), or with `transposed` [block_k, block_q] (k on sublanes, for dk/dv).
    Query row r of block i sits at global index q_start + i * block_q + r; key column c at j * block_k + c.
    """
    bq, bk = cfg.block_q, cfg.block_k
    shape, q_axis, k_axis = ((bk, bq), 1, 0) if transposed else ((bq, bk), 0, 1)
    mask = None
    if cfg.causal or cfg.kv_padded > cfg.kv_len:
        k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, shape, k_axis)
        if cfg.kv_padded > cfg.kv_len:
            mask = k_pos < cfg.kv_len
        if cfg.causal:
            q_pos = q_start + i * bq + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
            causal = q_pos >= k_pos
            mask = causal if mask is None else jnp.logical_and(mask, causal)
    if cfg.has_segments:
        if transposed:
            same = refs["kv_seg_col"][...][:, :1] == refs["q_seg_row"][...][:1, :]
        else:
            same = refs["q_seg"][...][:, :1] == refs["kv_seg"][...][:1, :]
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def _rotate(cfg: _Config, x, pos_name, refs, *, inverse=False):
    """Applies the fused RoPE to a loaded tile (float32 math), or returns it unchanged without RoPE."""
    if cfg.rope_theta is None:
        return x
    # tpu=True: rotate-half with pltpu.roll, a native lane rotate that the TPU interpreter also implements.
    return rope_tile(x, refs[pos_name][...][:, :1], refs["inv_freq"][...], x.shape[-1], inverse=inverse,
                     tpu=True)


def _load_q(cfg, refs):
    q = refs["q"][...]
    if cfg.rope_theta is None:
        return q
    return _rotate(cfg, q, "q_pos", refs).astype(q.dtype)


def _load_k(cfg, refs):
    k = refs["k"][...]
    if cfg.rope_theta is None:
        return k
    return _rotate(cfg, k, "k_pos", refs).astype(k.dtype)


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(q_start_ref, *all_refs, cfg: _Config, names):
    refs = dict(zip(names, all_refs))
    o_ref, lse_ref, m_sc, l_sc, acc_sc, q_sc = all_refs[len(names):]
    i, j = pl.program_id(2), pl.program_id(3)
    q_start = q_start_ref[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        q_sc[...] = _load_q(cfg, refs)

    @pl.when(cfg.block_needed(i, j, q_start))
    def _step():
        s = _nt_dot(q_sc[...], _load_k(cfg, refs)) * cfg.scale
        mask = _mask(cfg, i, j, q_start, refs)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]                                       # [bq, LANES], lanes equal
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_next[:, :1])
        corr = jnp.exp(m_prev - m_next)
        l_sc[...] = corr * l_sc[...] + p.sum(axis=1, keepdims=True)
        m_sc[...] = m_next
        v = refs["v"][...]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * corr[:, :1] + pv

    @pl.when(j == cfg.last_kv_block(i, q_start))
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / l[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l)


def _dq_kernel(q_start_ref, *all_refs, cfg: _Config, names):
    refs = dict(zip(names, all_refs))
    dq_ref, dq_sc, q_sc = all_refs[len(names):]
    i, j = pl.program_id(2), pl.program_id(3)
    q_start = q_start_ref[0]

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        q_sc[...] = _load_q(cfg, refs)

    @pl.when(cfg.block_needed(i, j, q_start))
    def _step():
        k = _load_k(cfg, refs)
        s = _nt_dot(q_sc[...], k) * cfg.scale
        p = jnp.exp(s - refs["lse"][...][:, :1])
        mask = _mask(cfg, i, j, q_start, refs)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = _nt_dot(refs["do"][...], refs["v"][...])
        ds = p * (dp - refs["delta"][...][:, :1])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == cfg.last_kv_block(i, q_start))
    def _finish():
        dq = dq_sc[...] * cfg.scale
        dq_ref[...] = _rotate(cfg, dq, "q_pos", refs, inverse=True).astype(dq_ref.dtype)


def _dkv_kernel(q_start_ref, *all_refs, cfg: _Config, names):
    refs = dict(zip(names, all_refs))
    dk_ref, dv_ref, dk_sc, dv_sc, k_sc = all_refs[len(names):]
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    q_start = q_start_ref[0]

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        k_sc[...] = _load_k(cfg, refs)

    @pl.when(cfg.block_needed(i, j, q_start))
    def _step():
        # Transposed tiles [block_k, block_q]: the per-query LSE and delta are rows (lane vectors), so they
        # are fetched as (8, block_q) slabs instead of (block_q, 128) columns, and no tile is transposed.
        q = _load_q(cfg, refs)
        do = refs["do"][...]
        s_t = _nt_dot(k_sc[...], q) * cfg.scale
        p_t = jnp.exp(s_t - refs["lse_row"][...][:1, :])
        mask = _mask(cfg, i, j, q_start, refs, transposed=True)
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv_sc[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = _nt_dot(refs["v"][...], do)
        ds_t = p_t * (dp_t - refs["delta_row"][...][:1, :])
        dk_sc[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(jnp.logical_and(g == cfg.group - 1, i == cfg.n_q - 1))
    def _finish():
        dk = dk_sc[...] * cfg.scale
        dk_ref[...] = _rotate(cfg, dk, "k_pos", refs, inverse=True).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call builders

def _compiler_params(n_reduction_dims, n_dims):
    semantics = ("parallel",) * (n_dims - n_reduction_dims) + ("arbitrary",) * n_reduction_dims
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _call(kernel, cfg, names, arrays, specs, q_start, *, grid, reduction_dims, out_specs, out_shape, scratch_shapes,
          name):
    """A pallas_call whose first operand, q_start int32[1], is scalar-prefetched into SMEM: the kernel gets its
    ref first and every index map gets it last (after the grid indices)."""
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, names=tuple(names)),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=specs,
                                               out_specs=out_specs, scratch_shapes=scratch_shapes),
        out_shape=out_shape,
        compiler_params=_compiler_params(reduction_dims, len(grid)),
        interpret=cfg.interpret,
        name=name,
    )(q_start, *arrays)


def _side_inputs(cfg, side, q_rows_of, kv_rows_of):
    """Names, arrays and BlockSpecs of the segment / RoPE inputs of the forward and dq kernels (q on sublanes).
    `*_rows_of(*grid idx, q_start ref)` -> (batch, block)."""
    names, arrays, specs = [], [], []
    bq, bk = cfg.block_q, cfg.block_k
    if cfg.has_segments:
        names += ["q_seg", "kv_seg"]
        arrays += [side["q_seg_cols"], side["kv_seg_rows"]]
        specs += [pl.BlockSpec((None, bq, LANES), lambda *ix: (*q_rows_of(*ix), 0)),
                  pl.BlockSpec((None, SUBLANES, bk), lambda *ix: _row_index(kv_rows_of(*ix)))]
    if cfg.rope_theta is not None:
        names += ["q_pos", "k_pos", "inv_freq"]
        arrays += [side["q_pos_cols"], side["k_pos_cols"], side["inv_freq"]]
        specs += [pl.BlockSpec((None, bq, LANES), lambda *ix: (*q_rows_of(*ix), 0)),
                  pl.BlockSpec((None, bk, LANES), lambda *ix: (*kv_rows_of(*ix), 0)),
                  pl.BlockSpec(side["inv_freq"].shape, lambda *ix: (0, 0))]
    return names, arrays, specs


def _row_index(batch_and_block):
    b, blk = batch_and_block
    return b, 0, blk


def _forward(cfg: _Config, q, k, v, q_start, side):
    """q [B, Hq, Sq_p, D], k/v [B, Hkv, Sk_p, D] -> out [B, Hq, Sq_p, D], lse [B, Hq, Sq_p, LANES] float32."""
    b, hq, sp, d = q.shape
    bq, bk, group = cfg.block_q, cfg.block_k, cfg.group

    def kv_block(i, j, qs):
        return jnp.minimum(j, cfg.last_kv_block(i, qs[0]))  # skipped blocks re-use a needed block: no DMA

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j, qs: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b_, h, i, j, qs: (b_, _div(h, group), kv_block(i, j, qs), 0))
    names = ["q", "k", "v"]
    arrays = [q, k, v]
    specs = [q_spec, kv_spec, kv_spec]
    more = _side_inputs(cfg, side, q_rows_of=lambda b_, h, i, j, qs: (b_, i),
                        kv_rows_of=lambda b_, h, i, j, qs: (b_, kv_block(i, j, qs)))
    names += more[0]; arrays += more[1]; specs += more[2]
    out, lse = _call(
        _fwd_kernel, cfg, names, arrays, specs, q_start,
        grid=(b, hq, cfg.n_q, cfg.n_k), reduction_dims=1,
        out_specs=[pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j, qs: (b_, h, i, 0)),
                   pl.BlockSpec((None, None, bq, LANES), lambda b_, h, i, j, qs: (b_, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, sp, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((bq, d), q.dtype)],
        name="flash_attention_tpu_fwd",
    )
    return out, lse


def _backward(cfg: _Config, q, k, v, q_start, side, lse, delta, do):
    """dq, dk, dv in the kernel layout; lse and delta [B, Hq, Sq_p] float32."""
    lse_cols, delta_cols = _columns_bh(lse), _columns_bh(delta)   # dq: per-row scalars as columns
    lse_rows, delta_rows = _rows_bh(lse), _rows_bh(delta)         # dk/dv: as rows (transposed tiles)
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    bq, bk, group = cfg.block_q, cfg.block_k, cfg.group

    # dq: same grid as the forward pass.
    def kv_block(i, j, qs):
        return jnp.minimum(j, cfg.last_kv_block(i, qs[0]))

    row_q = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j, qs: (b_, h, i, 0))
    col_q = pl.BlockSpec((None, None, bq, LANES), lambda b_, h, i, j, qs: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b_, h, i, j, qs: (b_, _div(h, group), kv_block(i, j, qs), 0))
    names = ["q", "k", "v", "do", "lse", "delta"]
    arrays = [q, k, v, do, lse_cols, delta_cols]
    specs = [row_q, kv_spec, kv_spec, row_q, col_q, col_q]
    more = _side_inputs(cfg, side, q_rows_of=lambda b_, h, i, j, qs: (b_, i),
                        kv_rows_of=lambda b_, h, i, j, qs: (b_, kv_block(i, j, qs)))
    names += more[0]; arrays += more[1]; specs += more[2]
    dq = _call(
        _dq_kernel, cfg, names, arrays, specs, q_start,
        grid=(b, hq, cfg.n_q, cfg.n_k), reduction_dims=1,
        out_specs=pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j, qs: (b_, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((bq, d), q.dtype)],
        name="flash_attention_tpu_dq",
    )

    # dk, dv: grid (B, Hkv, kv blocks, group, q blocks); the last two axes are the reduction.
    def q_block(j, i, qs):
        return jnp.maximum(i, cfg.first_q_block(j, qs[0]))  # skipped blocks re-use a needed block: no DMA

    def q_head(h, g):
        return h * group + g

    row_q = pl.BlockSpec((None, None, bq, d), lambda b_, h, j, g, i, qs: (b_, q_head(h, g), q_block(j, i, qs), 0))
    lane_q = pl.BlockSpec((None, None, SUBLANES, bq),
                          lambda b_, h, j, g, i, qs: (b_, q_head(h, g), 0, q_block(j, i, qs)))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, j, g, i, qs: (b_, h, j, 0))
    names = ["q", "k", "v", "do", "lse_row", "delta_row"]
    arrays = [q, k, v, do, lse_rows, delta_rows]
    specs = [row_q, kv_spec, kv_spec, row_q, lane_q, lane_q]
    if cfg.has_segments:
        names += ["q_seg_row", "kv_seg_col"]
        arrays += [side["q_seg_rows"], side["kv_seg_cols"]]
        specs += [pl.BlockSpec((None, SUBLANES, bq), lambda b_, h, j, g, i, qs: (b_, 0, q_block(j, i, qs))),
                  pl.BlockSpec((None, bk, LANES), lambda b_, h, j, g, i, qs: (b_, j, 0))]
    if cfg.rope_theta is not None:
        names += ["q_pos", "k_pos", "inv_freq"]
        arrays += [side["q_pos_cols"], side["k_pos_cols"], side["inv_freq"]]
        specs += [pl.BlockSpec((None, bq, LANES), lambda b_, h, j, g, i, qs: (b_, q_block(j, i, qs), 0)),
                  pl.BlockSpec((None, bk, LANES), lambda b_, h, j, g, i, qs: (b_, j, 0)),
                  pl.BlockSpec(side["inv_freq"].shape, lambda b_, h, j, g, i, qs: (0, 0))]

    dk, dv = _call(
        _dkv_kernel, cfg, names, arrays, specs, q_start,
        grid=(b, hkv, cfg.n_k, group, cfg.n_q), reduction_dims=2,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32),
                        pltpu.VMEM((bk, d), k.dtype)],
        name="flash_attention_tpu_dkv",
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- layout + custom_vjp

def _to_kernel_layout(x, padded_len):
    """[B, S, H, D] -> [B, H, Sp, D] zero-padded along the sequence."""
    x = x.transpose(0, 2, 1, 3)
    pad = padded_len - x.shape[2]
    return jnp.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) if pad else x


def _from_kernel_layout(x, seq_len):
    return x[:, :, :seq_len].transpose(0, 2, 1, 3)


def _columns(x, padded_len):
    """[B, S] -> [B, Sp, LANES] (value broadcast across lanes: a column operand of a tile)."""
    pad = padded_len - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)]) if pad else x
    return jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))


def _rows(x, padded_len):
    """[B, S] -> [B, SUBLANES, Sp] (broadcast across sublanes: a row operand of a tile)."""
    pad = padded_len - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)]) if pad else x
    return jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))


def _side_arrays(cfg: _Config, q_segment_ids, kv_segment_ids, positions, head_dim):
    """The segment ids of queries and keys as tile columns and rows, RoPE positions as columns, inv_freq.
    (Each kernel uses some of them; under jit the others are never computed.)"""
    side = {}
    if cfg.has_segments:
        q_seg, kv_seg = q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
        side.update(q_seg_cols=_columns(q_seg, cfg.q_padded), q_seg_rows=_rows(q_seg, cfg.q_padded),
                    kv_seg_cols=_columns(kv_seg, cfg.kv_padded), kv_seg_rows=_rows(kv_seg, cfg.kv_padded))
    if cfg.rope_theta is not None:
        pos = positions.astype(jnp.int32)   # queries and keys are one sequence (checked)
        freq = rope_inv_freq(head_dim, cfg.rope_theta)
        side.update(q_pos_cols=_columns(pos, cfg.q_padded), k_pos_cols=_columns(pos, cfg.kv_padded),
                    inv_freq=jnp.concatenate([freq, freq])[None, :])
    return side


def _fwd_impl(cfg, q, k, v, q_start, q_seg, kv_seg, positions):
    qt = _to_kernel_layout(q, cfg.q_padded)
    kt, vt = (_to_kernel_layout(x, cfg.kv_padded) for x in (k, v))
    side = _side_arrays(cfg, q_seg, kv_seg, positions, q.shape[-1])
    out, lse = _forward(cfg, qt, kt, vt, q_start, side)
    return _from_kernel_layout(out, cfg.q_len), lse[:, :, :cfg.q_len, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_start, q_seg, kv_seg, positions):
    return _fwd_impl(cfg, q, k, v, q_start, q_seg, kv_seg, positions)[0]


def _attention_fwd(cfg, q, k, v, q_start, q_seg, kv_seg, positions):
    out, lse = _fwd_impl(cfg, q, k, v, q_start, q_seg, kv_seg, positions)
    return out, (q, k, v, q_start, q_seg, kv_seg, positions, out, lse)


def _attention_bwd(cfg, residuals, dout):
    q, k, v, q_start, q_seg, kv_seg, positions, out, lse = residuals
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)   # [B, Sq, Hq]
    pad = [(0, 0), (0, 0), (0, cfg.q_padded - cfg.q_len)]
    delta, lse = jnp.pad(delta.transpose(0, 2, 1), pad), jnp.pad(lse, pad)           # [B, Hq, Sq_p]
    qt, dot = (_to_kernel_layout(x, cfg.q_padded) for x in (q, dout.astype(q.dtype)))
    kt, vt = (_to_kernel_layout(x, cfg.kv_padded) for x in (k, v))
    side = _side_arrays(cfg, q_seg, kv_seg, positions, q.shape[-1])
    dq, dk, dv = _backward(cfg, qt, kt, vt, q_start, side, lse, delta, dot)
    return (_from_kernel_layout(dq, cfg.q_len), _from_kernel_layout(dk, cfg.kv_len),
            _from_kernel_layout(dv, cfg.kv_len), None, None, None, None)


def _columns_bh(x):
    """[B, H, Sp] float -> [B, H, Sp, LANES]: a column operand (one value per sublane row)."""
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _rows_bh(x):
    """[B, H, Sp] float -> [B, H, SUBLANES, Sp]: a row operand (one value per lane)."""
    return jnp.broadcast_to(x[:, :, None, :], (x.shape[0], x.shape[1], SUBLANES, x.shape[2]))


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- public entry point

def _round_up(x, m):
    return -(-x // m) * m


def _check_ids(name, ids, shape):
    if ids.shape != shape or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise AttentionConfigError(f"{name} must be integer [batch, seq] = {shape}, got {ids.dtype}{list(ids.shape)}")


def _check(q, k, v, segment_ids, kv_segment_ids, q_start, block_q, block_k, rope):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise AttentionConfigError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if x.dtype not in _SUPPORTED_DTYPES:
            raise AttentionConfigError(
                f"pallas_tpu attention supports float32 and bfloat16, got {name}.dtype={x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionConfigError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise AttentionConfigError(f"q {q.shape} and k/v {k.shape}/{v.shape} do not match")
    same_sequence = q_start is None and kv_segment_ids is None
    if same_sequence and k.shape[1] != q.shape[1]:
        raise AttentionConfigError(
            f"q has {q.shape[1]} tokens and k/v {k.shape[1]}: a query chunk of a longer key sequence needs q_start "
            "(its first token's index among the keys)")
    if q.shape[2] % k.shape[2]:
        raise AttentionConfigError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    d = q.shape[3]
    if d % 64:
        raise AttentionConfigError(f"pallas_tpu attention needs head_dim a multiple of 64, got {d}")
    if rope is not None and d % LANES:
        raise AttentionConfigError(
            f"fused RoPE in pallas_tpu attention needs head_dim a multiple of {LANES}, got {d}; "
            "apply RoPE separately instead")
    if block_q <= 0 or block_q % LANES:
        raise AttentionConfigError(
            f"block_q must be a positive multiple of {LANES} (the lane axis of the dk/dv tiles), got {block_q}")
    if block_k <= 0 or block_k % LANES:
        raise AttentionConfigError(f"block_k must be a positive multiple of {LANES}, got {block_k}")
    if kv_segment_ids is not None and segment_ids is None:
        raise AttentionConfigError("kv_segment_ids needs segment_ids (the queries' segment ids)")
    if segment_ids is not None:
        _check_ids("segment_ids", segment_ids, q.shape[:2])
        if kv_segment_ids is None and not same_sequence:
            raise AttentionConfigError("with q_start, give kv_segment_ids (the keys' segment ids) too")
        if kv_segment_ids is not None:
            _check_ids("kv_segment_ids", kv_segment_ids, k.shape[:2])
    if q_start is not None:
        if jnp.ndim(q_start) != 0 or not jnp.issubdtype(jnp.result_type(q_start), jnp.integer):
            raise AttentionConfigError(f"q_start must be an integer scalar, got {q_start!r}")
        if isinstance(q_start, int) and q_start < 0:
            raise AttentionConfigError(f"q_start must be >= 0 (a key index), got {q_start}")
    if rope is not None:
        if not same_sequence:
            raise AttentionConfigError(
                "fused RoPE needs q and k/v to be one sequence (no q_start, no kv_segment_ids): rotate a query "
                "chunk and its keys by their own positions first (kernels.apply_rope), then call without rope")
        if not (isinstance(rope, tuple) and len(rope) == 2):
            raise AttentionConfigError("rope must be a (positions, theta) tuple")
        positions, theta = rope
        _check_ids("rope positions", positions, q.shape[:2])
        if not float(theta) > 0:
            raise AttentionConfigError(f"rope theta must be positive, got {theta}")


def flash_attention_tpu(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, interpret=False,
                        block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, rope=None, q_start=None,
                        kv_segment_ids=None):
    """Flash attention on TPU (Mosaic Pallas); see the module docstring.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], segment_ids [B, Sq] int or None (0 = padding), rope None or
    (positions [B, S] int, theta) to rotate q and k inside the kernel. `interpret=True` (or a
    `pltpu.InterpretParams`) runs the kernels in the TPU interpreter on CPU, `interpret="hlo"` as XLA ops
    (`kernels.pallas_compat.tpu_interpret_params`; what `kernels.sharded` uses on a mesh). Returns [B, Sq, Hq, D].

    By default q and k/v are one sequence (Sq == Sk). A query chunk of a longer key sequence (context
    parallelism) passes `q_start`, the keys' index of its first query (an int >= 0 or a traced int32 scalar,
    e.g. from `lax.axis_index`): query r sits at index q_start + r for the causal mask, and the keys' segment
    ids are `kv_segment_ids` [B, Sk] (required with `segment_ids`).
    """
    _check(q, k, v, segment_ids, kv_segment_ids, q_start, block_q, block_k, rope)
    interpret_params = tpu_interpret_params(interpret)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    positions, theta = (None, None) if rope is None else rope
    cfg = _Config(
        causal=bool(causal),
        scale=float(d ** -0.5 if sm_scale is None else sm_scale),
        # Short sequences: shrink the blocks to the (lane-rounded) lengths.
        block_q=min(block_q, _round_up(sq, LANES)), block_k=min(block_k, _round_up(sk, LANES)),
        q_len=sq, kv_len=sk,
        group=hq // k.shape[2],
        has_segments=segment_ids is not None,
        rope_theta=None if theta is None else float(theta),
        interpret=interpret_params,
    )
    q_start = jnp.reshape(jnp.asarray(0 if q_start is None else q_start, jnp.int32), (1,))
    return _attention(cfg, q, k, v, q_start, segment_ids, kv_segment_ids, positions)
