"""Flash attention for Hopper GPUs on the Pallas Mosaic GPU backend: forward, backward, custom VJP.

Layout (the project contract): q [B, S, Hq, D], k and v [B, S, Hkv, D], Hq % Hkv == 0; query head h reads
kv head h // (Hq // Hkv) straight from HBM (GQA-native, K/V are never repeated). TMA copies read
[block, D] slabs of the [B, S, H, D] arrays directly, so nothing is transposed.

Kernels (each `plgpu.kernel`, `num_compute_wgs` compute warpgroups + 1 producer warpgroup per CTA):
- forward: each compute warpgroup owns `block_q` query rows; the producer warpgroup streams K/V blocks
  through a ring of `num_stages` SMEM slots with TMA, synchronized by "loaded" and "consumed" barriers.
  Q K^T and P V run on `wgmma` with fp32 accumulators; the online softmax is fp32 in base 2; the kernel
  saves the log-sum-exp (base 2, scaled) for the backward pass.
- backward dq: the same structure as the forward; recomputes P from the saved LSE and accumulates dQ.
- backward dk/dv: each compute warpgroup owns `block_kv_bwd` key rows and accumulates dK and dV over every
  query head of its GQA group and every visible query block, streamed by the producer; no atomics and no
  per-q-head dK/dV copies.

Masking: causal (query i sees keys j <= i), segment ids (same segment only; 0 = padding, which attends
among itself exactly like `kernels.attention_reference`), and keys beyond the true length. Blocks that
causality hides completely are skipped; blocks that need no mask take a mask-free path.
Sequence lengths that are not block multiples are zero-padded in the wrapper and masked in the kernels.

Dtypes: bf16 and fp16 only (wgmma with 16-bit operands; softmax, LSE and all accumulation are fp32).
float32 inputs are refused with `AttentionConfigError` rather than silently rounded to bf16: cast them
yourself if bf16 matmuls are acceptable, or use implementation "xla" (fp32 throughout).

Shared memory: each CTA's SMEM (tiles, ring slots, vectors, barriers) must fit Hopper's 227 KiB. The block
sizes default to None = the largest of a few configurations whose three kernels all fit for this head_dim
(head_dim 256 gets block_kv 64 and one compute warpgroup); explicit block sizes that overflow are refused
with `AttentionConfigError` naming the kernel and the bytes, before Mosaic would fail with a bare ValueError.

Where it runs: on a Hopper GPU (checked through `kernels.pallas_compat.require_hopper_target`, which
follows the lowering target: `jax.export(..., platforms=["cuda"])` lowers it on a CPU host; jit for a CPU,
or a non-Hopper GPU, gets `AttentionConfigError`). The compiler parameters pin Mosaic GPU's Lane lowering
semantics (JAX 0.11 made Warpgroup the default; this kernel uses explicit register layouts, i.e. Lane);
PHI4_MOSAIC_GPU_SEMANTICS=warpgroup selects the other one (see `lowering_semantics`).
tests/test_cuda_lowering.py runs Mosaic GPU's real lowering (layouts, wgmma operands, SMEM limits) for CUDA
on a CPU: forward and gradients, head_dim 64/128/256, GQA, segment ids, fused RoPE. It has not yet been
compiled by ptxas nor run on a GPU.

Fused RoPE (`rope=(positions, theta)`): q and k tiles are rotated in SMEM right after their TMA load
(NeoX rotate-half on the two column halves of the tile, fp32 angles `position * inv_freq` from integer
positions, inv_freq computed by `kernels.rope_reference.rope_inv_freq`), in the forward, dq and dk/dv
kernels. A tile private to one warpgroup (its q rows; its K rows in dk/dv) is rotated by that warpgroup;
a ring tile shared by the compute warpgroups (K in forward/dq, Q in dk/dv) is rotated once per load,
64-row chunk c by warpgroup c % num_compute_wgs, and a per-slot "rotated" barrier (one arrival per
warpgroup) orders those writes before any warpgroup's wgmma reads the slot. dq and dk are rotated back
(by -angle) in SMEM before they are stored, so gradients are with respect to the un-rotated q and k.
Angles are range-reduced to [-pi, pi] before sin/cos (the approx-math `sin.approx` is only accurate
there). With RoPE the SMEM tiles use a 64-byte swizzle when head_dim / 2 is not a multiple of 64
elements (head_dim 64 or 192), so each half is a whole number of swizzle tiles.
Checked in the interpreter and lowered for CUDA (tests/test_cuda_lowering.py); not yet run on a GPU.

Runs on CPU in Mosaic GPU interpret mode with `interpret=True` (see `kernels.mosaic_gpu_interpret`).
The interpreter simulates SMEM, TMA, barriers and warpgroup threads, but it has no register layouts and
cannot run wgmma with transposed or register operands, nor `run_state`: under `interpret` the matmuls
are `lax.dot_general`s of the same operands and layout casts are skipped. Those few differences, and
everything else version-dependent (e.g. `plgpu.kernel` argument spellings), live in the "API
compatibility" section below; the other Mosaic GPU calls used here are the same in JAX 0.10.2 and 0.11.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu_interpret
from kernels.attention_reference import MASK_VALUE
from kernels.pallas_compat import require_hopper_target
from kernels.rope_reference import rope_inv_freq

# --------------------------------------------------------------------------------- API compatibility
# Everything version-dependent about the Mosaic GPU Pallas API lives here.

_KERNEL_PARAMS = inspect.signature(plgpu.kernel).parameters
_LOG2E = math.log2(math.e)
# Finite "minus infinity" (base-2 score units): a block in which a row sees no key then contributes
# exp2(0) = 1 per key, and the first visible key erases it (exp2(MASK - m) == 0), as in the reference.


def _layout_wgmma():
    return plgpu.Layout.WGMMA


def _layout_rows():
    """Layout of a [rows] vector that broadcasts along the columns of a WGMMA-layout tile."""
    return plgpu.Layout.WGMMA.reduce(1)


def _layout_cols():
    """Layout of a [cols] vector that broadcasts along the rows of a WGMMA-layout tile."""
    return plgpu.Layout.WGMMA.reduce(0)


# Register layouts only matter to the GPU compiler; the interpreter has no lowering for layout casts,
# so with `interpret` they are left out (values are plain arrays there).

def _full(shape, value, layout, interpret):
    x = jnp.full(shape, value, jnp.float32)
    return x if interpret else plgpu.layout_cast(x, layout)


def _zeros(shape, layout, interpret):
    return _full(shape, 0.0, layout, interpret)


def _iota(shape, dim, interpret):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=_layout_wgmma())


def _load_vector(smem_ref, layout, interpret):
    if interpret:
        return smem_ref[...]
    return plgpu.load(smem_ref, (), layout=layout)


def _tile_smem(shape, dtype, swizzle=128):
    """SMEM buffer whose last dim is the head dim, tiled and swizzled (128 bytes unless told) for TMA and wgmma."""
    itemsize = jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _vector_smem(shape, dtype):
    return plgpu.SMEM(shape, dtype)


def _rebalance_registers(producer):
    """Warp specialization: the producer warpgroup gives its registers to the compute warpgroups."""
    if producer:
        plgpu.set_max_registers(40, action="decrease")
    else:
        plgpu.set_max_registers(232, action="increase")


def _barriers(count, arrivals=1):
    return plgpu.Barrier(num_arrivals=arrivals, num_barriers=count)


def _load_operand(x):
    return x if isinstance(x, jax.Array) else x[...]


def _interpreted_matmul(a, b, transpose_b):
    """What wgmma computes, as a plain dot: the interpreter cannot take transposed or register operands."""
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(_load_operand(a), _load_operand(b), dims, preferred_element_type=jnp.float32)


def _matmul_into(acc_shape, a, b, *, transpose_b=False, interpret=False):
    """a @ b (or a @ b^T) with fp32 accumulation into a fresh accumulator; returns the value.

    On a GPU this is one `wgmma` (a: SMEM ref or 16-bit register value, b: SMEM ref, transposed through a
    ref transform). The Mosaic GPU interpreter of JAX 0.10 handles neither transposed nor register
    operands of wgmma, so under `interpret` the same product is a `lax.dot_general` of the loaded values.
    """
    if interpret:
        return _interpreted_matmul(a, b, transpose_b)
    if transpose_b:
        b = plgpu.transpose_ref(b, (1, 0))

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(acc_shape, jnp.float32))


def _matmul_accumulate(acc, a, b, *, transpose_b=False, interpret=False):
    """acc + a @ b on wgmma, the fp32 accumulator `acc` (WGMMA layout) fed in place via `pl.run_state`.

    The interpreter cannot interpret `run_state` (nor register operands), so there it is a plain add.
    """
    if interpret:
        return acc + _interpreted_matmul(a, b, transpose_b)
    if transpose_b:
        b = plgpu.transpose_ref(b, (1, 0))

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def _idiv(x, n):
    return lax.div(jnp.asarray(x, jnp.int32), jnp.asarray(n, jnp.int32))


def _irem(x, n):
    return lax.rem(jnp.asarray(x, jnp.int32), jnp.asarray(n, jnp.int32))


def _cdiv(x, n):
    return pl.cdiv(jnp.asarray(x, jnp.int32), jnp.asarray(n, jnp.int32))


SEMANTICS_ENV = "PHI4_MOSAIC_GPU_SEMANTICS"
SEMANTICS = ("lane", "warpgroup")


def lowering_semantics() -> str:
    """The Mosaic GPU lowering semantics the kernels are compiled with: "lane" (the default: the kernels place
    values in explicit register layouts) or "warpgroup", chosen by the environment variable
    PHI4_MOSAIC_GPU_SEMANTICS, read when a kernel is traced (bench/attention_probe.py sets it to retry a
    failed compile with the other semantics)."""
    value = os.environ.get(SEMANTICS_ENV, "").strip().lower() or "lane"
    if value not in SEMANTICS:
        raise _config_error()(f"{SEMANTICS_ENV}={os.environ[SEMANTICS_ENV]!r}: choose one of {SEMANTICS}")
    return value


def _compiler_params():
    """approx_math, and the lowering semantics pinned (default Lane: the kernels place values in explicit
    register layouts; JAX 0.11 changed Mosaic GPU's default to Warpgroup). See `lowering_semantics`."""
    params = {"approx_math": True}
    semantics = lowering_semantics()
    fields = getattr(plgpu.CompilerParams, "__dataclass_fields__", {})
    if "lowering_semantics" in fields and hasattr(plgpu, "LoweringSemantics"):
        params["lowering_semantics"] = getattr(plgpu.LoweringSemantics, semantics.capitalize())
    return plgpu.CompilerParams(**params)


def _run_kernel(body, *, out_type, scratch, grid, grid_names, num_threads, interpret, interpret_options, name):
    kwargs = dict(grid=grid, grid_names=grid_names, num_threads=num_threads, thread_name="wg",
                  compiler_params=_compiler_params())
    if "out_type" in _KERNEL_PARAMS:
        kwargs.update(out_type=out_type, scratch_types=scratch)
    else:  # older spelling
        kwargs.update(out_shape=out_type, scratch_shapes=scratch)
    if interpret:
        kwargs["interpret"] = mosaic_gpu_interpret.interpret_params(**dict(interpret_options))
    if "kernel_name" in _KERNEL_PARAMS or "kernel_name" in inspect.signature(plgpu.Mesh).parameters:
        kwargs["kernel_name"] = name
    call = plgpu.kernel(body, **kwargs)
    if interpret:
        return call

    def on_hopper(first, *rest):  # refuses to lower / run anywhere but a Hopper GPU (see the module docstring)
        return call(require_hopper_target(first, what="pallas_gpu (Mosaic GPU flash attention)"), *rest)
    return on_hopper


# ------------------------------------------------------------------------------------------ config

def _config_error():
    from kernels.dispatch import AttentionConfigError  # noqa: PLC0415 (dispatch imports this module lazily)
    return AttentionConfigError


@dataclasses.dataclass(frozen=True)
class _Cfg:
    seq_len: int       # true (unpadded) sequence length; inputs are zero-padded past it
    head_dim: int
    group: int         # q heads per kv head
    causal: bool
    has_segments: bool
    scale: float
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    num_stages: int
    num_compute_wgs: int
    interpret: bool
    interpret_options: tuple = ()  # InterpretGPUParams fields, as sorted (name, value) pairs
    rope: bool = False  # fused RoPE: positions and inv_freq are extra kernel inputs

    @property
    def c(self):  # scores -> base-2 softmax units
        return self.scale * _LOG2E

    @property
    def swizzle(self):
        """Swizzle (bytes) of the q/k/v/do tiles: 128, or 64 with RoPE when a head-dim half is not a whole
        number of 128-byte (64-element) swizzle tiles, so both halves can be sliced out of the tile."""
        if self.rope and (self.head_dim // 2) % 64:
            return 64
        return 128


def _round_up(x, m):
    return -(-x // m) * m


# ------------------------------------------------------------------------------------------- RoPE

_ROPE_CHUNK = 64  # rows rotated at once: one warpgroup's WGMMA-layout row tile
# 2*pi split so that turns * _TWO_PI_HI is exact (8 significant bits) for |turns| < 2**16.
_TWO_PI_HI = 6.28125
_TWO_PI_LO = 2 * math.pi - _TWO_PI_HI


def _cos_sin(angles):
    """cos and sin of fp32 angles, range-reduced to [-pi, pi] first (Cody-Waite with a 2-term 2*pi):
    under approx math these are `cos/sin.approx.f32`, accurate only near zero."""
    turns = lax.round(angles * (1.0 / (2 * math.pi)))
    reduced = (angles - turns * _TWO_PI_HI) - turns * _TWO_PI_LO
    return jnp.cos(reduced), jnp.sin(reduced)


def _rope_rows(cfg, tile_ref, pos_ref, freq_ref, *, inverse):
    """Rotates tile_ref [64, D] (16-bit SMEM) in place: NeoX rotate-half by angles pos_ref [64] (int32 SMEM)
    times freq_ref [D/2] (fp32 SMEM), in fp32; `inverse` rotates by -angle (RoPE's backward)."""
    rows, half = tile_ref.shape[0], cfg.head_dim // 2
    pos = _load_vector(pos_ref, _layout_rows(), cfg.interpret).astype(jnp.float32)
    freq = _load_vector(freq_ref, _layout_cols(), cfg.interpret)
    shape = (rows, half)
    cos, sin = _cos_sin(lax.broadcast_in_dim(pos, shape, [0]) * lax.broadcast_in_dim(freq, shape, [1]))
    if inverse:
        sin = -sin
    lo_ref, hi_ref = tile_ref.at[:, pl.ds(0, half)], tile_ref.at[:, pl.ds(half, half)]
    lo, hi = lo_ref[...].astype(jnp.float32), hi_ref[...].astype(jnp.float32)
    lo_ref[...] = (lo * cos - hi * sin).astype(tile_ref.dtype)
    hi_ref[...] = (hi * cos + lo * sin).astype(tile_ref.dtype)


def _rope_own_tile(cfg, tile_ref, pos_ref, freq_ref, *, inverse=False):
    """Rotates a tile [rows, D] that only this warpgroup uses, then makes it visible to its wgmma / TMA."""
    for c in range(tile_ref.shape[0] // _ROPE_CHUNK):
        chunk = pl.ds(c * _ROPE_CHUNK, _ROPE_CHUNK)
        _rope_rows(cfg, tile_ref.at[chunk], pos_ref.at[chunk], freq_ref, inverse=inverse)
    plgpu.commit_smem()


def _rope_shared_tile(cfg, wg, tile_ref, pos_ref, freq_ref, rotated):
    """Rotates a ring tile [rows, D] read by every compute warpgroup: 64-row chunk c by warpgroup
    c % num_compute_wgs; then each warpgroup arrives on `rotated` (one arrival per warpgroup) and waits
    for all of them, so no wgmma reads the tile before every chunk is rotated. Every compute warpgroup
    must call this once per load of the slot (drained steps too), which keeps barrier phases in step."""
    nwg = cfg.num_compute_wgs
    for c in range(tile_ref.shape[0] // _ROPE_CHUNK):
        chunk = pl.ds(c * _ROPE_CHUNK, _ROPE_CHUNK)
        rotate = functools.partial(_rope_rows, cfg, tile_ref.at[chunk], pos_ref.at[chunk], freq_ref,
                                   inverse=False)
        if nwg == 1:
            rotate()
        else:
            pl.when(wg == c % nwg)(rotate)
    plgpu.commit_smem()
    plgpu.barrier_arrive(rotated)
    plgpu.barrier_wait(rotated)


def _rope_scratch(cfg, q_rows, k_rows, q_slots, k_slots):
    """Extra scratch for fused RoPE: SMEM (q positions [q_slots, q_rows], k positions [k_slots, k_rows],
    inv_freq per warpgroup [nwg, D/2]) and barriers (ring positions loaded, ring tile rotated, and each
    warpgroup's own position / inv_freq loads)."""
    nwg, st = cfg.num_compute_wgs, cfg.num_stages
    smem = (_vector_smem((q_slots, q_rows), jnp.int32), _vector_smem((k_slots, k_rows), jnp.int32),
            _vector_smem((nwg, cfg.head_dim // 2), jnp.float32))
    return [smem, (_barriers(st), _barriers(st, arrivals=nwg), _barriers(2 * nwg))]


def _load_own_rope_inputs(cfg, wg, batch, rows, pos_ref, freq_ref, pos_smem, freq_smem, own):
    """TMA this warpgroup's positions (rows `rows`) and inv_freq into its SMEM and wait for them."""
    nwg = cfg.num_compute_wgs
    plgpu.copy_gmem_to_smem(pos_ref.at[batch, rows], pos_smem, own.at[wg])
    plgpu.copy_gmem_to_smem(freq_ref, freq_smem, own.at[nwg + wg])
    plgpu.barrier_wait(own.at[wg])
    plgpu.barrier_wait(own.at[nwg + wg])


# ------------------------------------------------------------------------------------------ masks

def _mask_rows_q(cfg, shape, q_base, k_base, q_seg, k_seg):
    """Visibility mask of a [block_q, block_kv] tile (rows = queries)."""
    q_pos = _iota(shape, 0, cfg.interpret) + q_base
    k_pos = _iota(shape, 1, cfg.interpret) + k_base
    mask = k_pos < cfg.seq_len
    if cfg.causal:
        mask = mask & (q_pos >= k_pos)
    if q_seg is not None:
        mask = mask & (lax.broadcast_in_dim(q_seg, shape, [0]) == lax.broadcast_in_dim(k_seg, shape, [1]))
    return mask


def _mask_rows_k(cfg, shape, k_base, q_base, k_seg, q_seg):
    """Visibility mask of a [block_kv, block_q] tile (rows = keys); also hides padded query rows."""
    k_pos = _iota(shape, 0, cfg.interpret) + k_base
    q_pos = _iota(shape, 1, cfg.interpret) + q_base
    mask = q_pos < cfg.seq_len
    if cfg.causal:
        mask = mask & (q_pos >= k_pos)
    if k_seg is not None:
        mask = mask & (lax.broadcast_in_dim(k_seg, shape, [0]) == lax.broadcast_in_dim(q_seg, shape, [1]))
    return mask


# ----------------------------------------------------------------------- kv-streaming kernel skeleton

def _kv_step_counts(cfg, q_tile, wg, block_q, block_kv):
    """For one q tile and warpgroup: (kv steps the CTA streams, steps this warpgroup computes, leading
    steps that need no mask, this warpgroup's first query row)."""
    n_kv = -(-cfg.seq_len // block_kv)  # kv blocks past the true length are never loaded
    cta_q_end = (q_tile + 1) * (cfg.num_compute_wgs * block_q)
    q_base = q_tile * (cfg.num_compute_wgs * block_q) + wg * block_q
    if cfg.causal:
        n_cta = jnp.minimum(_cdiv(cta_q_end, block_kv), n_kv)
        n_wg = jnp.minimum(_cdiv(q_base + block_q, block_kv), n_kv)
        n_free = jnp.minimum(_idiv(q_base, block_kv), cfg.seq_len // block_kv)
    else:
        n_cta = jnp.int32(n_kv)
        n_wg = jnp.int32(n_kv)
        n_free = jnp.int32(cfg.seq_len // block_kv)
    if cfg.has_segments:
        n_free = jnp.int32(0)
    return n_cta, n_wg, jnp.minimum(n_free, n_wg), q_base


def _kv_producer(cfg, n_cta, batch, kv_head, k_ref, v_ref, seg_ref, k_smem, v_smem, kseg_smem,
                 loaded, consumed, block_kv, rope_pos=None):
    """Producer warpgroup: TMA K/V (and key segment ids; with RoPE, `rope_pos` = (positions ref, key
    positions SMEM ring, its loaded barriers)) blocks 0..n_cta-1 into the SMEM ring."""
    k_loaded, v_loaded, s_loaded = loaded

    def body(step, _):
        slot = _irem(step, cfg.num_stages)

        @pl.when(step >= cfg.num_stages)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        rows = pl.ds(step * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[slot], k_loaded.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[slot], v_loaded.at[slot])
        if seg_ref is not None:
            plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], kseg_smem.at[slot], s_loaded.at[slot])
        if rope_pos is not None:
            pos_ref, kpos_smem, p_loaded = rope_pos
            plgpu.copy_gmem_to_smem(pos_ref.at[batch, rows], kpos_smem.at[slot], p_loaded.at[slot])
        return _

    lax.fori_loop(0, n_cta, body, None)
    _await_last_releases(cfg, n_cta, consumed)


def _await_last_releases(cfg, n_steps, consumed):
    """Producer epilogue: wait until the consumers release the last slots (every barrier phase observed)."""
    def body(step, _):
        plgpu.barrier_wait(consumed.at[_irem(step, cfg.num_stages)])
        return _
    lax.fori_loop(jnp.maximum(n_steps - cfg.num_stages, 0), n_steps, body, None)


# ------------------------------------------------------------------------------------------ kernel refs

def _split_refs(cfg, refs, n_inputs, n_outputs):
    """Kernel refs -> (inputs, seg_ref, (pos_ref, freq_ref) or None, outputs, scratch, rope scratch or None).

    Inputs are the `n_inputs` fixed arrays, then segment ids (if any), then positions and inv_freq (RoPE);
    the RoPE scratch (`_rope_scratch`) comes last."""
    n_in = n_inputs + cfg.has_segments + 2 * cfg.rope
    ins, outs, scratch = refs[:n_inputs], refs[n_in:n_in + n_outputs], refs[n_in + n_outputs:]
    seg_ref = refs[n_inputs] if cfg.has_segments else None
    rope_in = refs[n_in - 2:n_in] if cfg.rope else None
    rope_scratch = None
    if cfg.rope:
        scratch, rope_scratch = scratch[:-2], scratch[-2:]
    return ins, seg_ref, rope_in, outs, scratch, rope_scratch


# ------------------------------------------------------------------------------------------ forward

def _forward_kernel(cfg: _Cfg, dtype):
    bq, bkv, d, nwg = cfg.block_q, cfg.block_kv, cfg.head_dim, cfg.num_compute_wgs

    def kernel(*refs):
        (q_ref, k_ref, v_ref), seg_ref, rope_in, (out_ref, lse_ref), scratch, rope_scratch = _split_refs(
            cfg, refs, 3, 2)
        smem, loaded, consumed, own = scratch
        q_smem, k_smem, v_smem, lse_smem, qseg_smem, kseg_smem = smem
        k_loaded, v_loaded, s_loaded = loaded
        batch, q_head, q_tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
        kv_head = _idiv(q_head, cfg.group)
        wg = lax.axis_index("wg")

        @pl.when(wg < nwg)
        def _compute():
            _rebalance_registers(producer=False)
            n_cta, n_wg, n_free, q_base = _kv_step_counts(cfg, q_tile, wg, bq, bkv)
            my_q = q_smem.at[wg]
            rows = pl.ds(q_base, bq)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, q_head], my_q, own.at[wg])
            plgpu.barrier_wait(own.at[wg])
            q_seg = None
            if seg_ref is not None:
                plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], qseg_smem.at[wg], own.at[nwg + wg])
                plgpu.barrier_wait(own.at[nwg + wg])
                q_seg = _load_vector(qseg_smem.at[wg], _layout_rows(), cfg.interpret)
            if cfg.rope:
                (pos_ref, freq_ref), ((qpos_smem, kpos_smem, freq_smem), (p_loaded, rotated, rope_own)) = (
                    rope_in, rope_scratch)
                _load_own_rope_inputs(cfg, wg, batch, rows, pos_ref, freq_ref, qpos_smem.at[wg],
                                      freq_smem.at[wg], rope_own)
                _rope_own_tile(cfg, my_q, qpos_smem.at[wg], freq_smem.at[wg])

            def rotate_k(slot):
                if cfg.rope:
                    plgpu.barrier_wait(p_loaded.at[slot])
                    _rope_shared_tile(cfg, wg, k_smem.at[slot], kpos_smem.at[slot], freq_smem.at[wg],
                                      rotated.at[slot])

            def step(kv_step, carry, masked):
                acc, m_i, l_i = carry
                slot = _irem(kv_step, cfg.num_stages)
                plgpu.barrier_wait(k_loaded.at[slot])
                rotate_k(slot)
                s = _matmul_into((bq, bkv), my_q, k_smem.at[slot], transpose_b=True, interpret=cfg.interpret) * cfg.c
                if masked:
                    k_seg = None
                    if seg_ref is not None:
                        plgpu.barrier_wait(s_loaded.at[slot])
                        k_seg = _load_vector(kseg_smem.at[slot], _layout_cols(), cfg.interpret)
                    mask = _mask_rows_q(cfg, (bq, bkv), q_base, kv_step * bkv, q_seg, k_seg)
                    s = jnp.where(mask, s, MASK_VALUE)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(v_loaded.at[slot])
                acc = _matmul_accumulate(acc, p.astype(dtype), v_smem.at[slot], interpret=cfg.interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return acc, m_new, l_i

            def drain(kv_step, _):
                # Blocks the other warpgroup needs but causality hides from this one: release the slot
                # (after rotating this warpgroup's share of the K tile, which the other one reads).
                slot = _irem(kv_step, cfg.num_stages)
                plgpu.barrier_wait(k_loaded.at[slot])
                rotate_k(slot)
                plgpu.barrier_wait(v_loaded.at[slot])
                if seg_ref is not None:
                    plgpu.barrier_wait(s_loaded.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return _

            carry = (_zeros((bq, d), _layout_wgmma(), cfg.interpret),
                     _full((bq,), -jnp.inf, _layout_rows(), cfg.interpret),
                     _zeros((bq,), _layout_rows(), cfg.interpret))
            carry = lax.fori_loop(0, n_free, functools.partial(step, masked=False), carry)
            acc, m_i, l_i = lax.fori_loop(n_free, n_wg, functools.partial(step, masked=True), carry)
            lax.fori_loop(n_wg, n_cta, drain, None)

            out = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
            my_q[...] = out.astype(dtype)
            lse_smem.at[wg][...] = m_i + jnp.log2(l_i)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, out_ref.at[batch, rows, q_head], commit_group=False)
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, q_head, rows], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nwg)
        def _produce():
            _rebalance_registers(producer=True)
            n_cta = _kv_step_counts(cfg, q_tile, 0, bq, bkv)[0]
            rope_pos = None
            if cfg.rope:
                rope_pos = (rope_in[0], rope_scratch[0][1], rope_scratch[1][0])
            _kv_producer(cfg, n_cta, batch, kv_head, k_ref, v_ref, seg_ref, k_smem, v_smem, kseg_smem,
                         loaded, consumed, bkv, rope_pos)

    return kernel


def _extra_args(cfg, seg, pos, freq):
    return ((seg,) if cfg.has_segments else ()) + ((pos, freq) if cfg.rope else ())


def _forward_scratch(cfg: _Cfg, dtype):
    bq, bkv, d, nwg, st = cfg.block_q, cfg.block_kv, cfg.head_dim, cfg.num_compute_wgs, cfg.num_stages
    tile = functools.partial(_tile_smem, swizzle=cfg.swizzle)
    scratch = [
        (tile((nwg, bq, d), dtype), tile((st, bkv, d), dtype),
         tile((st, bkv, d), dtype), _vector_smem((nwg, bq), jnp.float32),
         _vector_smem((nwg, bq), jnp.int32), _vector_smem((st, bkv), jnp.int32)),
        (_barriers(st), _barriers(st), _barriers(st)),  # k / v / key-segment loaded, per slot
        _barriers(st, arrivals=nwg),                     # slot consumed by every compute warpgroup
        _barriers(2 * nwg),                              # each warpgroup's own q / q-segment load
    ]
    if cfg.rope:
        scratch += _rope_scratch(cfg, bq, bkv, nwg, st)
    return scratch


def _forward_call(cfg: _Cfg, q, k, v, seg, pos, freq):
    b, sp, hq, d = q.shape
    bq, nwg = cfg.block_q, cfg.num_compute_wgs
    scratch = _forward_scratch(cfg, q.dtype)
    out_type = (jax.ShapeDtypeStruct((b, sp, hq, d), q.dtype), jax.ShapeDtypeStruct((b, hq, sp), jnp.float32))
    call = _run_kernel(_forward_kernel(cfg, q.dtype), out_type=out_type, scratch=scratch,
                       grid=(hq, sp // (nwg * bq), b), grid_names=("heads", "q_tiles", "batch"),
                       num_threads=nwg + 1, interpret=cfg.interpret,
                       interpret_options=cfg.interpret_options, name="flash_attention_fwd")
    return call(q, k, v, *_extra_args(cfg, seg, pos, freq))


# ----------------------------------------------------------------------------------------- backward dq

def _dq_kernel(cfg: _Cfg, dtype):
    bq, bkv, d, nwg = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.head_dim, cfg.num_compute_wgs

    def kernel(*refs):
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg_ref, rope_in, (dq_ref,), scratch, rope_scratch = (
            _split_refs(cfg, refs, 6, 1))
        smem, loaded, consumed, own = scratch
        q_smem, do_smem, lse_smem, delta_smem, qseg_smem, k_smem, v_smem, kseg_smem = smem
        k_loaded, v_loaded, s_loaded = loaded
        batch, q_head, q_tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
        kv_head = _idiv(q_head, cfg.group)
        wg = lax.axis_index("wg")

        @pl.when(wg < nwg)
        def _compute():
            _rebalance_registers(producer=False)
            n_cta, n_wg, n_free, q_base = _kv_step_counts(cfg, q_tile, wg, bq, bkv)
            rows = pl.ds(q_base, bq)
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]
            copies = [(q_ref.at[batch, rows, q_head], my_q), (do_ref.at[batch, rows, q_head], my_do),
                      (lse_ref.at[batch, q_head, rows], lse_smem.at[wg]),
                      (delta_ref.at[batch, q_head, rows], delta_smem.at[wg])]
            if seg_ref is not None:
                copies.append((seg_ref.at[batch, rows], qseg_smem.at[wg]))
            for i, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, own.at[i * nwg + wg])
            for i in range(len(copies)):
                plgpu.barrier_wait(own.at[i * nwg + wg])
            lse = _load_vector(lse_smem.at[wg], _layout_rows(), cfg.interpret)
            delta = _load_vector(delta_smem.at[wg], _layout_rows(), cfg.interpret)
            q_seg = _load_vector(qseg_smem.at[wg], _layout_rows(), cfg.interpret) if seg_ref is not None else None
            if cfg.rope:
                (pos_ref, freq_ref), ((qpos_smem, kpos_smem, freq_smem), (p_loaded, rotated, rope_own)) = (
                    rope_in, rope_scratch)
                _load_own_rope_inputs(cfg, wg, batch, rows, pos_ref, freq_ref, qpos_smem.at[wg],
                                      freq_smem.at[wg], rope_own)
                _rope_own_tile(cfg, my_q, qpos_smem.at[wg], freq_smem.at[wg])

            def rotate_k(slot):
                if cfg.rope:
                    plgpu.barrier_wait(p_loaded.at[slot])
                    _rope_shared_tile(cfg, wg, k_smem.at[slot], kpos_smem.at[slot], freq_smem.at[wg],
                                      rotated.at[slot])

            def step(kv_step, dq, masked):
                slot = _irem(kv_step, cfg.num_stages)
                plgpu.barrier_wait(k_loaded.at[slot])
                rotate_k(slot)
                s = _matmul_into((bq, bkv), my_q, k_smem.at[slot], transpose_b=True, interpret=cfg.interpret) * cfg.c
                p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
                if seg_ref is not None:
                    plgpu.barrier_wait(s_loaded.at[slot])
                if masked:
                    k_seg = None
                    if seg_ref is not None:
                        k_seg = _load_vector(kseg_smem.at[slot], _layout_cols(), cfg.interpret)
                    mask = _mask_rows_q(cfg, (bq, bkv), q_base, kv_step * bkv, q_seg, k_seg)
                    p = jnp.where(mask, p, 0.0)
                plgpu.barrier_wait(v_loaded.at[slot])
                dp = _matmul_into((bq, bkv), my_do, v_smem.at[slot], transpose_b=True, interpret=cfg.interpret)
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                dq = _matmul_accumulate(dq, ds.astype(dtype), k_smem.at[slot], interpret=cfg.interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return dq

            def drain(kv_step, _):
                slot = _irem(kv_step, cfg.num_stages)
                plgpu.barrier_wait(k_loaded.at[slot])
                rotate_k(slot)
                plgpu.barrier_wait(v_loaded.at[slot])
                if seg_ref is not None:
                    plgpu.barrier_wait(s_loaded.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return _

            dq = _zeros((bq, d), _layout_wgmma(), cfg.interpret)
            dq = lax.fori_loop(0, n_free, functools.partial(step, masked=False), dq)
            dq = lax.fori_loop(n_free, n_wg, functools.partial(step, masked=True), dq)
            lax.fori_loop(n_wg, n_cta, drain, None)
            my_q[...] = (dq * cfg.scale).astype(dtype)
            plgpu.commit_smem()
            if cfg.rope:  # the gradient w.r.t. the rotated q, rotated back: w.r.t. q
                _rope_own_tile(cfg, my_q, qpos_smem.at[wg], freq_smem.at[wg], inverse=True)
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[batch, rows, q_head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nwg)
        def _produce():
            _rebalance_registers(producer=True)
            n_cta = _kv_step_counts(cfg, q_tile, 0, bq, bkv)[0]
            rope_pos = None
            if cfg.rope:
                rope_pos = (rope_in[0], rope_scratch[0][1], rope_scratch[1][0])
            _kv_producer(cfg, n_cta, batch, kv_head, k_ref, v_ref, seg_ref, k_smem, v_smem, kseg_smem,
                         loaded, consumed, bkv, rope_pos)

    return kernel


def _dq_scratch(cfg: _Cfg, dtype):
    bq, bkv, d, nwg, st = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.head_dim, cfg.num_compute_wgs, cfg.num_stages
    tile = functools.partial(_tile_smem, swizzle=cfg.swizzle)
    scratch = [
        (tile((nwg, bq, d), dtype), tile((nwg, bq, d), dtype),
         _vector_smem((nwg, bq), jnp.float32), _vector_smem((nwg, bq), jnp.float32),
         _vector_smem((nwg, bq), jnp.int32),
         tile((st, bkv, d), dtype), tile((st, bkv, d), dtype), _vector_smem((st, bkv), jnp.int32)),
        (_barriers(st), _barriers(st), _barriers(st)),
        _barriers(st, arrivals=nwg),
        _barriers(5 * nwg),
    ]
    if cfg.rope:
        scratch += _rope_scratch(cfg, bq, bkv, nwg, st)
    return scratch


def _dq_call(cfg: _Cfg, q, k, v, do, lse, delta, seg, pos, freq):
    b, sp, hq, d = q.shape
    bq, nwg = cfg.block_q_bwd, cfg.num_compute_wgs
    scratch = _dq_scratch(cfg, q.dtype)
    call = _run_kernel(_dq_kernel(cfg, q.dtype), out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
                       scratch=scratch, grid=(hq, sp // (nwg * bq), b), grid_names=("heads", "q_tiles", "batch"),
                       num_threads=nwg + 1, interpret=cfg.interpret,
                       interpret_options=cfg.interpret_options, name="flash_attention_bwd_dq")
    return call(q, k, v, do, lse, delta, *_extra_args(cfg, seg, pos, freq))


# --------------------------------------------------------------------------------------- backward dk/dv

def _dkv_q_ranges(cfg, kv_tile, wg, block_q, block_kv):
    """Query-block ranges for one warpgroup of a kv tile.

    Returns (i_cta, i_wg, i_free, i_tail, n_q): the CTA streams q blocks [i_cta, n_q) for every q head of
    the group; this warpgroup skips [i_cta, i_wg) (causally hidden), masks [i_wg, i_free) and
    [i_tail, n_q), and runs mask-free on [i_free, i_tail).
    """
    n_q = -(-cfg.seq_len // block_q)
    cta_k_base = kv_tile * (cfg.num_compute_wgs * block_kv)
    k_base = cta_k_base + wg * block_kv
    full_q_blocks = cfg.seq_len // block_q
    if cfg.causal:
        i_cta = _idiv(cta_k_base, block_q)
        i_wg = jnp.minimum(_idiv(k_base, block_q), n_q)
        i_free = _cdiv(k_base + block_kv - 1, block_q)
    else:
        i_cta = i_wg = i_free = jnp.int32(0)
    if cfg.has_segments:
        i_free = jnp.int32(n_q)
    i_free = jnp.clip(i_free, i_wg, jnp.maximum(i_wg, min(full_q_blocks, n_q)))
    i_tail = jnp.maximum(i_free, full_q_blocks) if not cfg.has_segments else i_free
    i_tail = jnp.minimum(i_tail, n_q)
    return i_cta, i_wg, i_free, i_tail, jnp.int32(n_q), k_base


def _dkv_kernel(cfg: _Cfg, dtype):
    bq, bkv, d, nwg, g = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.head_dim, cfg.num_compute_wgs, cfg.group

    def kernel(*refs):
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg_ref, rope_in, (dk_ref, dv_ref), scratch, rope_scratch = (
            _split_refs(cfg, refs, 6, 2))
        smem, loaded, consumed, own = scratch
        k_smem, v_smem, kseg_smem, q_smem, do_smem, lse_smem, delta_smem, qseg_smem = smem
        batch, kv_head, kv_tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv_tiles")
        wg = lax.axis_index("wg")

        @pl.when(wg < nwg)
        def _compute():
            _rebalance_registers(producer=False)
            i_cta, i_wg, i_free, i_tail, n_q, k_base = _dkv_q_ranges(cfg, kv_tile, wg, bq, bkv)
            steps_per_head = n_q - i_cta
            rows = pl.ds(k_base, bkv)
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            copies = [(k_ref.at[batch, rows, kv_head], my_k), (v_ref.at[batch, rows, kv_head], my_v)]
            if seg_ref is not None:
                copies.append((seg_ref.at[batch, rows], kseg_smem.at[wg]))
            for i, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, own.at[i * nwg + wg])
            for i in range(len(copies)):
                plgpu.barrier_wait(own.at[i * nwg + wg])
            k_seg = _load_vector(kseg_smem.at[wg], _layout_rows(), cfg.interpret) if seg_ref is not None else None
            if cfg.rope:
                (pos_ref, freq_ref), ((qpos_smem, kpos_smem, freq_smem), (p_loaded, rotated, rope_own)) = (
                    rope_in, rope_scratch)
                _load_own_rope_inputs(cfg, wg, batch, rows, pos_ref, freq_ref, kpos_smem.at[wg],
                                      freq_smem.at[wg], rope_own)
                _rope_own_tile(cfg, my_k, kpos_smem.at[wg], freq_smem.at[wg])

            def wait_loaded(slot):
                for bar in loaded:
                    plgpu.barrier_wait(bar.at[slot])
                if cfg.rope:  # this warpgroup's share of the q tile, which every warpgroup reads
                    plgpu.barrier_wait(p_loaded.at[slot])
                    _rope_shared_tile(cfg, wg, q_smem.at[slot], qpos_smem.at[slot], freq_smem.at[wg],
                                      rotated.at[slot])

            def step(i, carry, head, masked):
                dk, dv = carry
                stream_step = head * steps_per_head + (i - i_cta)
                slot = _irem(stream_step, cfg.num_stages)
                wait_loaded(slot)
                s_t = _matmul_into((bkv, bq), my_k, q_smem.at[slot], transpose_b=True, interpret=cfg.interpret) * cfg.c
                lse = _load_vector(lse_smem.at[slot], _layout_cols(), cfg.interpret)
                p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                if masked:
                    q_seg = None
                    if seg_ref is not None:
                        q_seg = _load_vector(qseg_smem.at[slot], _layout_cols(), cfg.interpret)
                    mask = _mask_rows_k(cfg, (bkv, bq), k_base, i * bq, k_seg, q_seg)
                    p_t = jnp.where(mask, p_t, 0.0)
                dv = _matmul_accumulate(dv, p_t.astype(dtype), do_smem.at[slot], interpret=cfg.interpret)
                dp_t = _matmul_into((bkv, bq), my_v, do_smem.at[slot], transpose_b=True, interpret=cfg.interpret)
                delta = _load_vector(delta_smem.at[slot], _layout_cols(), cfg.interpret)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                dk = _matmul_accumulate(dk, ds_t.astype(dtype), q_smem.at[slot], interpret=cfg.interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return dk, dv

            def drain(i, _, head):
                slot = _irem(head * steps_per_head + (i - i_cta), cfg.num_stages)
                wait_loaded(slot)
                plgpu.barrier_arrive(consumed.at[slot])
                return _

            carry = (_zeros((bkv, d), _layout_wgmma(), cfg.interpret), _zeros((bkv, d), _layout_wgmma(), cfg.interpret))

            def per_head(head, carry):
                lax.fori_loop(i_cta, i_wg, functools.partial(drain, head=head), None)
                carry = lax.fori_loop(i_wg, i_free, functools.partial(step, head=head, masked=True), carry)
                carry = lax.fori_loop(i_free, i_tail, functools.partial(step, head=head, masked=False), carry)
                return lax.fori_loop(i_tail, n_q, functools.partial(step, head=head, masked=True), carry)

            dk, dv = lax.fori_loop(0, g, per_head, carry)
            my_k[...] = (dk * cfg.scale).astype(dtype)
            my_v[...] = dv.astype(dtype)
            plgpu.commit_smem()
            if cfg.rope:  # the gradient w.r.t. the rotated k, rotated back: w.r.t. k
                _rope_own_tile(cfg, my_k, kpos_smem.at[wg], freq_smem.at[wg], inverse=True)
            plgpu.copy_smem_to_gmem(my_k, dk_ref.at[batch, rows, kv_head], commit_group=False)
            plgpu.copy_smem_to_gmem(my_v, dv_ref.at[batch, rows, kv_head], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nwg)
        def _produce():
            _rebalance_registers(producer=True)
            i_cta, _, _, _, n_q, _ = _dkv_q_ranges(cfg, kv_tile, 0, bq, bkv)
            steps_per_head = n_q - i_cta
            q_loaded, do_loaded, lse_loaded, delta_loaded = loaded[:4]

            def body(step, _):
                slot = _irem(step, cfg.num_stages)

                @pl.when(step >= cfg.num_stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                head = _idiv(step, steps_per_head)
                q_head = kv_head * g + head
                rows = pl.ds((i_cta + _irem(step, steps_per_head)) * bq, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, q_head], q_smem.at[slot], q_loaded.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, q_head], do_smem.at[slot], do_loaded.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[batch, q_head, rows], lse_smem.at[slot], lse_loaded.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[batch, q_head, rows], delta_smem.at[slot],
                                        delta_loaded.at[slot])
                if seg_ref is not None:
                    plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], qseg_smem.at[slot], loaded[4].at[slot])
                if cfg.rope:
                    plgpu.copy_gmem_to_smem(rope_in[0].at[batch, rows], rope_scratch[0][0].at[slot],
                                            rope_scratch[1][0].at[slot])
                return _

            lax.fori_loop(0, g * steps_per_head, body, None)
            _await_last_releases(cfg, g * steps_per_head, consumed)

    return kernel


def _dkv_scratch(cfg: _Cfg, dtype):
    bq, bkv, d, nwg, st = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.head_dim, cfg.num_compute_wgs, cfg.num_stages
    n_loaded = 5 if cfg.has_segments else 4
    tile = functools.partial(_tile_smem, swizzle=cfg.swizzle)
    scratch = [
        (tile((nwg, bkv, d), dtype), tile((nwg, bkv, d), dtype), _vector_smem((nwg, bkv), jnp.int32),
         tile((st, bq, d), dtype), tile((st, bq, d), dtype),
         _vector_smem((st, bq), jnp.float32), _vector_smem((st, bq), jnp.float32),
         _vector_smem((st, bq), jnp.int32)),
        tuple(_barriers(st) for _ in range(n_loaded)),
        _barriers(st, arrivals=nwg),
        _barriers(3 * nwg),
    ]
    if cfg.rope:  # q positions ride the ring; k positions are per warpgroup
        scratch += _rope_scratch(cfg, bq, bkv, st, nwg)
    return scratch


def _dkv_call(cfg: _Cfg, q, k, v, do, lse, delta, seg, pos, freq):
    b, sp, hkv, d = k.shape
    bkv, nwg = cfg.block_kv_bwd, cfg.num_compute_wgs
    scratch = _dkv_scratch(cfg, q.dtype)
    out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    call = _run_kernel(_dkv_kernel(cfg, q.dtype), out_type=out_type, scratch=scratch,
                       grid=(hkv, sp // (nwg * bkv), b), grid_names=("heads", "kv_tiles", "batch"),
                       num_threads=nwg + 1, interpret=cfg.interpret,
                       interpret_options=cfg.interpret_options, name="flash_attention_bwd_dkv")
    return call(q, k, v, do, lse, delta, *_extra_args(cfg, seg, pos, freq))


# --------------------------------------------------------------------------------- custom VJP wrapper

@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, seg, pos, freq, cfg):
    return _forward_call(cfg, q, k, v, seg, pos, freq)[0]


def _flash_fwd(q, k, v, seg, pos, freq, cfg):
    out, lse = _forward_call(cfg, q, k, v, seg, pos, freq)
    return out, (q, k, v, seg, pos, freq, out, lse)


def _flash_bwd(cfg, residuals, dout):
    q, k, v, seg, pos, freq, out, lse = residuals
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), dout.astype(jnp.float32))
    dout = dout.astype(q.dtype)
    dq = _dq_call(cfg, q, k, v, dout, lse, delta, seg, pos, freq)
    dk, dv = _dkv_call(cfg, q, k, v, dout, lse, delta, seg, pos, freq)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------ shared-memory budget

SMEM_LIMIT_BYTES = 227 * 1024  # Hopper's opt-in shared memory per block (what Mosaic GPU checks against)
_SMEM_ALIGN = 1024             # swizzled TMA tiles start on 1024-byte boundaries
_SMEM_RESERVED = 2048 + 1024   # Mosaic's reduction scratch (CompilerParams.reduction_scratch_bytes) + slack

# (block_q, block_kv, block_q_bwd, block_kv_bwd, num_stages, num_compute_wgs), tried in order when the caller
# leaves them None: the first whose three kernels fit in SMEM for the inputs' head_dim is used.
_BLOCK_CANDIDATES = ((64, 128, 64, 64, 2, 2), (64, 64, 64, 64, 2, 2), (64, 64, 64, 64, 2, 1))
_BLOCK_FIELDS = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd", "num_stages", "num_compute_wgs")


def _smem_bytes(scratch) -> int:
    """Upper estimate of the SMEM a kernel's scratch takes (tiles / vectors rounded up to 1024 bytes, 8 bytes
    per barrier, Mosaic's reduction scratch); tests/test_cuda_lowering.py checks it bounds Mosaic's own count."""
    if isinstance(scratch, (list, tuple)):
        return sum(_smem_bytes(x) for x in scratch)
    if isinstance(scratch, plgpu.Barrier):
        count = scratch.num_barriers
        return 8 * (math.prod(count) if isinstance(count, tuple) else count)
    nbytes = math.prod(scratch.shape) * jnp.dtype(scratch.dtype).itemsize
    return _round_up(nbytes, _SMEM_ALIGN)


def smem_usage(cfg: _Cfg, dtype=jnp.bfloat16) -> dict[str, int]:
    """Estimated SMEM bytes per CTA of each kernel ("forward", "dq", "dkv") for this configuration."""
    return {name: _smem_bytes(build(cfg, dtype)) + _SMEM_RESERVED
            for name, build in (("forward", _forward_scratch), ("dq", _dq_scratch), ("dkv", _dkv_scratch))}


def _smem_overflow(cfg: _Cfg, dtype) -> str | None:
    over = {name: n for name, n in smem_usage(cfg, dtype).items() if n > SMEM_LIMIT_BYTES}
    if not over:
        return None
    return ", ".join(f"{name} kernel ~{n // 1024} KiB" for name, n in over.items())


# ------------------------------------------------------------------------------------------ entry point

def _validate(q, k, v, segment_ids, *, blocks, rope):
    err = _config_error()
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise err(f"pallas_gpu: q, k, v must be [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise err(f"pallas_gpu: q {q.shape} and k/v {k.shape}/{v.shape} must agree in batch, seq, head_dim")
    if q.shape[2] % k.shape[2]:
        raise err(f"pallas_gpu: query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if not q.dtype == k.dtype == v.dtype:
        raise err(f"pallas_gpu: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == jnp.float32:
        raise err("pallas_gpu: float32 inputs are not supported: the kernel's wgmma matmuls take 16-bit operands, "
                  "and it does not round float32 to bfloat16 behind your back. Cast q, k, v to bfloat16 yourself "
                  "if bf16 matmuls are acceptable, or use implementation='xla' (or None) for float32 attention")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise err(f"pallas_gpu: dtype {q.dtype} is not supported; use bfloat16 or float16")
    d = q.shape[3]
    if d % 64 or not 64 <= d <= 256:
        raise err(f"pallas_gpu: head_dim must be a multiple of 64 in [64, 256] (wgmma tiles), got {d}")
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
        blk = blocks[name]
        if blk is not None and (blk % 64 or blk <= 0):
            raise err(f"pallas_gpu: {name} must be a positive multiple of 64 (one wgmma row tile), got {blk}")
    for name in ("block_q", "block_kv_bwd"):
        blk = blocks[name]
        if blk is not None and blk > 128:
            raise err(f"pallas_gpu: {name} ({blk}) is a per-warpgroup register tile and must be <= 128")
    if blocks["num_stages"] is not None and blocks["num_stages"] < 2:
        raise err(f"pallas_gpu: num_stages must be >= 2 for a pipelined K/V loop, got {blocks['num_stages']}")
    if blocks["num_compute_wgs"] is not None and blocks["num_compute_wgs"] not in (1, 2):
        raise err(f"pallas_gpu: num_compute_wgs must be 1 or 2, got {blocks['num_compute_wgs']}")
    if segment_ids is not None:
        if segment_ids.shape != q.shape[:2]:
            raise err(f"pallas_gpu: segment_ids must be [batch, seq] = {q.shape[:2]}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise err(f"pallas_gpu: segment_ids must be integers, got {segment_ids.dtype}")
    if rope is not None:
        if not (isinstance(rope, tuple) and len(rope) == 2):
            raise err(f"pallas_gpu: rope must be a (positions, theta) tuple, got {type(rope).__name__}")
        positions, theta = rope
        shape, dtype = getattr(positions, "shape", None), getattr(positions, "dtype", None)
        if shape != q.shape[:2] or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise err(f"pallas_gpu: rope positions must be integer [batch, seq] = {q.shape[:2]}, got "
                      f"{dtype}{list(shape or ())}")
        if not float(theta) > 0:
            raise err(f"pallas_gpu: rope theta must be positive, got {theta}")


def _make_cfg(q, k, segment_ids, causal, sm_scale, interpret, rope, blocks):
    """The kernel configuration: explicit block options as given, the others from the first candidate
    (`_BLOCK_CANDIDATES`) whose kernels fit in SMEM; AttentionConfigError when none fits."""
    s, d = q.shape[1], q.shape[3]

    def cfg_for(values):
        return _Cfg(seq_len=s, head_dim=d, group=q.shape[2] // k.shape[2], causal=bool(causal),
                    has_segments=segment_ids is not None,
                    scale=float(d ** -0.5 if sm_scale is None else sm_scale), interpret=bool(interpret),
                    interpret_options=tuple(sorted(interpret.items())) if isinstance(interpret, dict) else (),
                    rope=rope is not None, **values)

    tried = []
    for candidate in _BLOCK_CANDIDATES:
        values = {name: blocks[name] if blocks[name] is not None else default
                  for name, default in zip(_BLOCK_FIELDS, candidate)}
        cfg = cfg_for(values)
        overflow = _smem_overflow(cfg, q.dtype)
        if overflow is None:
            return cfg
        tried.append((values, overflow))
        if all(blocks[name] is not None for name in _BLOCK_FIELDS):
            break
    values, overflow = tried[0]
    explicit = {n: v for n, v in blocks.items() if v is not None}
    hint = (f"; with the explicit options {explicit} no configuration fits: pass a smaller block_kv / block_q_bwd / "
            "block_kv_bwd or num_compute_wgs=1, or leave them None to let the kernel choose") if explicit else ""
    raise _config_error()(
        f"pallas_gpu: head_dim {d} with blocks {values} needs more shared memory than Hopper's "
        f"{SMEM_LIMIT_BYTES // 1024} KiB per block ({overflow}){hint}")


def flash_attention_gpu(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, interpret=False,
                        block_q=None, block_kv=None, block_q_bwd=None, block_kv_bwd=None, num_stages=None,
                        num_compute_wgs=None, rope=None):
    """Flash attention on Hopper (Mosaic GPU): q [B,S,Hq,D], k/v [B,S,Hkv,D] -> [B,S,Hq,D]; differentiable.

    bf16 / fp16 only: float32 inputs raise `AttentionConfigError` (they are never rounded to bf16 silently).
    `rope=(positions [B, S] int, theta)` rotates q and k inside the kernels (see the module docstring):
    the result equals `kernels.apply_rope` on q and k followed by attention.

    Blocks: the forward gives each of `num_compute_wgs` warpgroups `block_q` query rows and streams
    `block_kv` keys per step through `num_stages` SMEM slots; the backward uses `block_q_bwd` /
    `block_kv_bwd`. None (the default) picks, per option, from the first configuration that fits in SMEM for
    this head_dim (64/128/64/64, 2 stages, 2 warpgroups up to head_dim 192). `interpret=True` runs the kernels
    on CPU in Mosaic GPU interpret mode; a dict instead passes `InterpretGPUParams` options (e.g.
    {"detect_races": True}). Without `interpret` the kernels lower only for a Hopper GPU (CUDA).
    Raises `kernels.AttentionConfigError` for shapes, dtypes or options the kernels cannot handle.
    """
    blocks = {"block_q": block_q, "block_kv": block_kv, "block_q_bwd": block_q_bwd, "block_kv_bwd": block_kv_bwd,
              "num_stages": num_stages, "num_compute_wgs": num_compute_wgs}
    _validate(q, k, v, segment_ids, blocks=blocks, rope=rope)
    if interpret and not mosaic_gpu_interpret.is_available():
        mosaic_gpu_interpret.interpret_params()  # raises MosaicGPUInterpretUnavailable with the reason
    cfg = _make_cfg(q, k, segment_ids, causal, sm_scale, interpret, rope, blocks)
    s, d = q.shape[1], q.shape[3]
    nwg = cfg.num_compute_wgs
    multiple = math.lcm(nwg * cfg.block_q, cfg.block_kv, nwg * cfg.block_q_bwd, nwg * cfg.block_kv_bwd,
                        cfg.block_q_bwd, cfg.block_kv_bwd)
    sp = _round_up(s, multiple)
    seg = pos = freq = None
    if rope is not None:
        positions, theta = rope
        pos = positions.astype(jnp.int32)
        if sp != s:
            pos = jnp.pad(pos, [(0, 0), (0, sp - s)])
        freq = rope_inv_freq(d, float(theta))
    if sp != s:
        pad = [(0, 0), (0, sp - s), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        if sp != s:
            seg = jnp.pad(seg, [(0, 0), (0, sp - s)], constant_values=-1)
    out = _flash(q, k, v, seg, pos, freq, cfg)
    return out[:, :s]
