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

Dtypes: bf16 and fp16 run natively. float32 inputs are deliberately cast to bf16 for the matmuls (wgmma
takes 16-bit operands here; softmax, LSE and all accumulation stay fp32) and results are cast back to
float32: expect bf16-level error for fp32 inputs.

Fused RoPE (`rope=`) is not implemented in this kernel yet: passing it raises AttentionConfigError.

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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu_interpret

# --------------------------------------------------------------------------------- API compatibility
# Everything version-dependent about the Mosaic GPU Pallas API lives here.

_KERNEL_PARAMS = inspect.signature(plgpu.kernel).parameters
_LOG2E = math.log2(math.e)
# Finite "minus infinity" (base-2 score units): a block in which a row sees no key then contributes
# exp2(0) = 1 per key, and the first visible key erases it (exp2(MASK - m) == 0), as in the reference.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


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


def _tile_smem(shape, dtype):
    """SMEM buffer whose last dim is the head dim, tiled and 128-byte swizzled for TMA and wgmma."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = 128
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


def _run_kernel(body, *, out_type, scratch, grid, grid_names, num_threads, interpret, interpret_options, name):
    kwargs = dict(grid=grid, grid_names=grid_names, num_threads=num_threads, thread_name="wg",
                  compiler_params=plgpu.CompilerParams(approx_math=True))
    if "out_type" in _KERNEL_PARAMS:
        kwargs.update(out_type=out_type, scratch_types=scratch)
    else:  # older spelling
        kwargs.update(out_shape=out_type, scratch_shapes=scratch)
    if interpret:
        kwargs["interpret"] = mosaic_gpu_interpret.interpret_params(**dict(interpret_options))
    if "kernel_name" in _KERNEL_PARAMS or "kernel_name" in inspect.signature(plgpu.Mesh).parameters:
        kwargs["kernel_name"] = name
    return plgpu.kernel(body, **kwargs)


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

    @property
    def c(self):  # scores -> base-2 softmax units
        return self.scale * _LOG2E


def _round_up(x, m):
    return -(-x // m) * m


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
                 loaded, consumed, block_kv):
    """Producer warpgroup: TMA K/V (and key segment ids) blocks 0..n_cta-1 into the SMEM ring."""
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
        return _

    lax.fori_loop(0, n_cta, body, None)
    _await_last_releases(cfg, n_cta, consumed)


def _await_last_releases(cfg, n_steps, consumed):
    """Producer epilogue: wait until the consumers release the last slots (every barrier phase observed)."""
    def body(step, _):
        plgpu.barrier_wait(consumed.at[_irem(step, cfg.num_stages)])
        return _
    lax.fori_loop(jnp.maximum(n_steps - cfg.num_stages, 0), n_steps, body, None)


# ------------------------------------------------------------------------------------------ forward

def _forward_kernel(cfg: _Cfg, dtype):
    bq, bkv, d, nwg = cfg.block_q, cfg.block_kv, cfg.head_dim, cfg.num_compute_wgs

    def kernel(*refs):
        if cfg.has_segments:
            q_ref, k_ref, v_ref, seg_ref, out_ref, lse_ref, smem, loaded, consumed, own = refs
        else:
            (q_ref, k_ref, v_ref, out_ref, lse_ref, smem, loaded, consumed, own), seg_ref = refs, None
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

            def step(kv_step, carry, masked):
                acc, m_i, l_i = carry
                slot = _irem(kv_step, cfg.num_stages)
                plgpu.barrier_wait(k_loaded.at[slot])
                s = _matmul_into((bq, bkv), my_q, k_smem.at[slot], transpose_b=True, interpret=cfg.interpret) * cfg.c
                if masked:
                    k_seg = None
                    if seg_ref is not None:
                        plgpu.barrier_wait(s_loaded.at[slot])
                        k_seg = _load_vector(kseg_smem.at[slot], _layout_cols(), cfg.interpret)
                    mask = _mask_rows_q(cfg, (bq, bkv), q_base, kv_step * bkv, q_seg, k_seg)
                    s = jnp.where(mask, s, _MASK_VALUE)
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
                # Blocks the other warpgroup needs but causality hides from this one: release the slot.
                slot = _irem(kv_step, cfg.num_stages)
                plgpu.barrier_wait(k_loaded.at[slot])
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
            _kv_producer(cfg, n_cta, batch, kv_head, k_ref, v_ref, seg_ref, k_smem, v_smem, kseg_smem,
                         loaded, consumed, bkv)

    return kernel


def _forward_call(cfg: _Cfg, q, k, v, seg):
    b, sp, hq, d = q.shape
    bq, bkv, nwg, st = cfg.block_q, cfg.block_kv, cfg.num_compute_wgs, cfg.num_stages
    scratch = [
        (_tile_smem((nwg, bq, d), q.dtype), _tile_smem((st, bkv, d), q.dtype),
         _tile_smem((st, bkv, d), q.dtype), _vector_smem((nwg, bq), jnp.float32),
         _vector_smem((nwg, bq), jnp.int32), _vector_smem((st, bkv), jnp.int32)),
        (_barriers(st), _barriers(st), _barriers(st)),  # k / v / key-segment loaded, per slot
        _barriers(st, arrivals=nwg),                     # slot consumed by every compute warpgroup
        _barriers(2 * nwg),                              # each warpgroup's own q / q-segment load
    ]
    out_type = (jax.ShapeDtypeStruct((b, sp, hq, d), q.dtype), jax.ShapeDtypeStruct((b, hq, sp), jnp.float32))
    call = _run_kernel(_forward_kernel(cfg, q.dtype), out_type=out_type, scratch=scratch,
                       grid=(hq, sp // (nwg * bq), b), grid_names=("heads", "q_tiles", "batch"),
                       num_threads=nwg + 1, interpret=cfg.interpret,
                       interpret_options=cfg.interpret_options, name="flash_attention_fwd")
    args = (q, k, v) + ((seg,) if cfg.has_segments else ())
    return call(*args)


# ----------------------------------------------------------------------------------------- backward dq

def _dq_kernel(cfg: _Cfg, dtype):
    bq, bkv, d, nwg = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.head_dim, cfg.num_compute_wgs

    def kernel(*refs):
        if cfg.has_segments:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dq_ref,
             smem, loaded, consumed, own) = refs
        else:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, loaded, consumed, own) = refs
            seg_ref = None
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

            def step(kv_step, dq, masked):
                slot = _irem(kv_step, cfg.num_stages)
                plgpu.barrier_wait(k_loaded.at[slot])
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
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[batch, rows, q_head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nwg)
        def _produce():
            _rebalance_registers(producer=True)
            n_cta = _kv_step_counts(cfg, q_tile, 0, bq, bkv)[0]
            _kv_producer(cfg, n_cta, batch, kv_head, k_ref, v_ref, seg_ref, k_smem, v_smem, kseg_smem,
                         loaded, consumed, bkv)

    return kernel


def _dq_call(cfg: _Cfg, q, k, v, do, lse, delta, seg):
    b, sp, hq, d = q.shape
    bq, bkv, nwg, st = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.num_compute_wgs, cfg.num_stages
    scratch = [
        (_tile_smem((nwg, bq, d), q.dtype), _tile_smem((nwg, bq, d), q.dtype),
         _vector_smem((nwg, bq), jnp.float32), _vector_smem((nwg, bq), jnp.float32),
         _vector_smem((nwg, bq), jnp.int32),
         _tile_smem((st, bkv, d), q.dtype), _tile_smem((st, bkv, d), q.dtype), _vector_smem((st, bkv), jnp.int32)),
        (_barriers(st), _barriers(st), _barriers(st)),
        _barriers(st, arrivals=nwg),
        _barriers(5 * nwg),
    ]
    call = _run_kernel(_dq_kernel(cfg, q.dtype), out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
                       scratch=scratch, grid=(hq, sp // (nwg * bq), b), grid_names=("heads", "q_tiles", "batch"),
                       num_threads=nwg + 1, interpret=cfg.interpret,
                       interpret_options=cfg.interpret_options, name="flash_attention_bwd_dq")
    args = (q, k, v, do, lse, delta) + ((seg,) if cfg.has_segments else ())
    return call(*args)


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
        if cfg.has_segments:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dk_ref, dv_ref,
             smem, loaded, consumed, own) = refs
        else:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem, loaded, consumed, own) = refs
            seg_ref = None
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

            def wait_loaded(slot):
                for bar in loaded:
                    plgpu.barrier_wait(bar.at[slot])

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
                return _

            lax.fori_loop(0, g * steps_per_head, body, None)
            _await_last_releases(cfg, g * steps_per_head, consumed)

    return kernel


def _dkv_call(cfg: _Cfg, q, k, v, do, lse, delta, seg):
    b, sp, hkv, d = k.shape
    bq, bkv, nwg, st = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.num_compute_wgs, cfg.num_stages
    n_loaded = 5 if cfg.has_segments else 4
    scratch = [
        (_tile_smem((nwg, bkv, d), k.dtype), _tile_smem((nwg, bkv, d), k.dtype), _vector_smem((nwg, bkv), jnp.int32),
         _tile_smem((st, bq, d), q.dtype), _tile_smem((st, bq, d), q.dtype),
         _vector_smem((st, bq), jnp.float32), _vector_smem((st, bq), jnp.float32),
         _vector_smem((st, bq), jnp.int32)),
        tuple(_barriers(st) for _ in range(n_loaded)),
        _barriers(st, arrivals=nwg),
        _barriers(3 * nwg),
    ]
    out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    call = _run_kernel(_dkv_kernel(cfg, q.dtype), out_type=out_type, scratch=scratch,
                       grid=(hkv, sp // (nwg * bkv), b), grid_names=("heads", "kv_tiles", "batch"),
                       num_threads=nwg + 1, interpret=cfg.interpret,
                       interpret_options=cfg.interpret_options, name="flash_attention_bwd_dkv")
    args = (q, k, v, do, lse, delta) + ((seg,) if cfg.has_segments else ())
    return call(*args)


# --------------------------------------------------------------------------------- custom VJP wrapper

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg):
    return _forward_call(cfg, q, k, v, seg)[0]


def _flash_fwd(q, k, v, seg, cfg):
    out, lse = _forward_call(cfg, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(cfg, residuals, dout):
    q, k, v, seg, out, lse = residuals
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), dout.astype(jnp.float32))
    dout = dout.astype(q.dtype)
    dq = _dq_call(cfg, q, k, v, dout, lse, delta, seg)
    dk, dv = _dkv_call(cfg, q, k, v, dout, lse, delta, seg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _is_hopper(device) -> bool:
    if device.platform != "gpu":
        return False
    capability = getattr(device, "compute_capability", None)
    if capability is not None:
        return str(capability).startswith("9.")
    return any(name in device.device_kind for name in ("H100", "H200", "H800", "GH200"))


def _validate(q, k, v, segment_ids, *, block_q, block_kv, block_q_bwd, block_kv_bwd, num_stages,
              num_compute_wgs, rope):
    err = _config_error()
    if rope is not None:
        raise err("pallas_gpu: fused RoPE (rope=...) is not implemented in the Mosaic GPU kernel yet; "
                  "apply kernels.apply_rope to q and k first")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise err(f"pallas_gpu: q, k, v must be [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise err(f"pallas_gpu: q {q.shape} and k/v {k.shape}/{v.shape} must agree in batch, seq, head_dim")
    if q.shape[2] % k.shape[2]:
        raise err(f"pallas_gpu: query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if not q.dtype == k.dtype == v.dtype:
        raise err(f"pallas_gpu: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise err(f"pallas_gpu: dtype {q.dtype} is not supported; use bfloat16, float16 or float32")
    d = q.shape[3]
    if d % 64 or not 64 <= d <= 256:
        raise err(f"pallas_gpu: head_dim must be a multiple of 64 in [64, 256] (wgmma tiles), got {d}")
    for name, blk in (("block_q", block_q), ("block_kv", block_kv), ("block_q_bwd", block_q_bwd),
                      ("block_kv_bwd", block_kv_bwd)):
        if blk % 64 or blk <= 0:
            raise err(f"pallas_gpu: {name} must be a positive multiple of 64 (one wgmma row tile), got {blk}")
    for name, blk in (("block_q", block_q), ("block_kv_bwd", block_kv_bwd)):
        if blk > 128:
            raise err(f"pallas_gpu: {name} ({blk}) is a per-warpgroup register tile and must be <= 128")
    if num_stages < 2:
        raise err(f"pallas_gpu: num_stages must be >= 2 for a pipelined K/V loop, got {num_stages}")
    if num_compute_wgs not in (1, 2):
        raise err(f"pallas_gpu: num_compute_wgs must be 1 or 2, got {num_compute_wgs}")
    if segment_ids is not None:
        if segment_ids.shape != q.shape[:2]:
            raise err(f"pallas_gpu: segment_ids must be [batch, seq] = {q.shape[:2]}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise err(f"pallas_gpu: segment_ids must be integers, got {segment_ids.dtype}")


def flash_attention_gpu(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, interpret=False,
                        block_q=64, block_kv=128, block_q_bwd=64, block_kv_bwd=64, num_stages=2,
                        num_compute_wgs=2, rope=None):
    """Flash attention on Hopper (Mosaic GPU): q [B,S,Hq,D], k/v [B,S,Hkv,D] -> [B,S,Hq,D]; differentiable.

    Blocks: the forward gives each of `num_compute_wgs` warpgroups `block_q` query rows and streams
    `block_kv` keys per step through `num_stages` SMEM slots; the backward uses `block_q_bwd` /
    `block_kv_bwd`. Defaults suit head_dim 128. `interpret=True` runs the kernels on CPU in Mosaic GPU
    interpret mode; a dict instead passes `InterpretGPUParams` options (e.g. {"detect_races": True}).
    float32 inputs are computed with bf16 matmul operands (see the module docstring).
    Raises `kernels.AttentionConfigError` for shapes, dtypes or options the kernels cannot handle.
    """
    _validate(q, k, v, segment_ids, block_q=block_q, block_kv=block_kv, block_q_bwd=block_q_bwd,
              block_kv_bwd=block_kv_bwd, num_stages=num_stages, num_compute_wgs=num_compute_wgs, rope=rope)
    if not interpret and not _is_hopper(jax.devices()[0]):
        raise _config_error()(
            f"pallas_gpu needs a Hopper GPU (sm_90: wgmma), found {jax.devices()[0].device_kind!r}; "
            "on a CPU pass interpret=True (Mosaic GPU interpret mode)")
    if interpret and not mosaic_gpu_interpret.is_available():
        mosaic_gpu_interpret.interpret_params()  # raises MosaicGPUInterpretUnavailable with the reason
    b, s, hq, d = q.shape
    in_dtype = q.dtype
    if in_dtype == jnp.float32:
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    multiple = math.lcm(num_compute_wgs * block_q, block_kv, num_compute_wgs * block_q_bwd,
                        num_compute_wgs * block_kv_bwd, block_q_bwd, block_kv_bwd)
    sp = _round_up(s, multiple)
    cfg = _Cfg(seq_len=s, head_dim=d, group=hq // k.shape[2], causal=bool(causal),
               has_segments=segment_ids is not None,
               scale=float(d ** -0.5 if sm_scale is None else sm_scale),
               block_q=block_q, block_kv=block_kv, block_q_bwd=block_q_bwd, block_kv_bwd=block_kv_bwd,
               num_stages=num_stages, num_compute_wgs=num_compute_wgs, interpret=bool(interpret),
               interpret_options=tuple(sorted(interpret.items())) if isinstance(interpret, dict) else ())
    seg = None
    if sp != s:
        pad = [(0, 0), (0, sp - s), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        if sp != s:
            seg = jnp.pad(seg, [(0, 0), (0, sp - s)], constant_values=-1)
    out = _flash(q, k, v, seg, cfg)
    return out[:, :s].astype(in_dtype)
