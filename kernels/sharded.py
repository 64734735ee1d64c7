"""The kernels in a program partitioned over a device mesh: every Pallas call wrapped in `jax.shard_map`.

XLA cannot partition a Pallas (Mosaic) custom call: under `jit` on a multi-device mesh a compiled Mosaic TPU kernel
raises "Mosaic kernels cannot be automatically partitioned", and an interpret-mode kernel on simulated CPU devices
hangs in a rendezvous. So a sharded program calls the kernels through these wrappers, which run the kernel once
per device on that device's shard (`jax.shard_map`, every mesh axis manual):

- `sharded_flash_attention(q, k, v, *, mesh, batch_axes, seq_axes, q_head_axes, kv_head_axes, causal=True,
  segment_ids=None, positions=None, rope_theta=None, sm_scale=None, implementation=None, interpret=False,
  seq_layout="contiguous")`: attention (with RoPE at `positions` when `rope_theta` is given, fused into the
  kernel where it can be). Batch and heads are split; when the sequence axis has more than one device the
  attention is context-parallel (`kernels.context_parallel`).
- `sharded_apply_rope(x, positions, *, mesh, batch_axes, seq_axes, head_axes, theta, implementation=None,
  interpret=False)`.
- `sharded_decode_attention(q, k_cache, v_cache, lengths, *, mesh, batch_axes, q_head_axes, kv_head_axes,
  sm_scale=None, implementation=None, interpret=False)`: the cache is split by batch and kv heads (not by length).
- `sharded_paged_attention(q, k_pages, v_pages, block_tables, lengths, *, mesh, batch_axes, q_head_axes,
  kv_head_axes, layer=None, sm_scale=None, implementation=None, interpret=False)`: the page pool is split by kv
  heads only (every device holds every page, of its heads); q, block tables and lengths by batch.

The mesh-axis arguments name, for each logical dimension, the mesh axis (a name, a tuple of names, or None) it is
split over; this package does not know any rules table: the caller (phi4_jax) derives them from its own. With no
mesh, or when every named axis has size 1, a wrapper is a plain call. A mesh that cannot split the inputs gets an
`AttentionConfigError` naming the axis and the sizes.

Interpret mode on a mesh. Inside one multi-device XLA program, XLA:CPU runs each device's operations in dataflow
order, so two operations that do not depend on each other (an interpreted kernel of one layer and a gradient
reduce-scatter of another) can run in different orders on different devices. JAX's TPU and Mosaic GPU
interpreters run a kernel as Python callbacks that wait for every device of the shard_map (a `threading.Barrier`);
a device that went into an XLA collective first waits there for the others, which wait in the barrier for it: a
deadlock (seen as a hang in a sharded train step, 1 run in ~8 on a loaded 2-core machine). Therefore:

- `interpret=True` for a Mosaic TPU kernel (flash attention "pallas_tpu", paged attention "pallas") on a mesh of
  more than one device becomes `interpret="hlo"` (`kernels.pallas_compat.HLO_INTERPRET`): the same kernel body
  lowered to ordinary XLA ops, with no callbacks and no barrier, and faster. Pass a `pltpu.InterpretParams` to get
  the TPU interpreter anyway (only safe in a program with no collective outside the kernels' own data flow).
- The backend-neutral Pallas kernels (RoPE, decode attention, the Triton paged kernel) are interpreted that way
  already.
- The Mosaic GPU kernel ("pallas_gpu") has only its callback interpreter, so the risk stays with it on a mesh.
  A callback interpreter also needs the CPU client to run every device at once: its thread pool has
  os.cpu_count() threads unless the `NPROC` environment variable says otherwise, and with fewer than 2 x devices
  threads the program deadlocks. Importing this module therefore sets NPROC (if unset and JAX has not started)
  when XLA_FLAGS asks for several simulated host devices, and the wrappers raise instead of hanging when the pool
  is too small.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from kernels import context_parallel
from kernels.attention_reference import DEFAULT_BLOCK_SIZE
from kernels.decode_attention import decode_attention
from kernels.dispatch import (
    AttentionConfigError,
    apply_rope,
    default_implementation,
    flash_attention,
    flash_attention_rope,
)
from kernels.paged_attention import paged_attention
from kernels.pallas_compat import HLO_INTERPRET

PALLAS_ATTENTION = ("pallas_tpu", "pallas_gpu")
_SIMULATED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def _simulated_device_count() -> int:
    match = _SIMULATED_DEVICES.search(os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else 1


def interpret_threads_needed(n_devices: int) -> int:
    """CPU client threads that interpret-mode kernels on `n_devices` simulated devices need (see docstring)."""
    return 2 * n_devices


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge  # noqa: PLC0415 (private; only asked whether the CPU client exists)
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True  # cannot tell: leave the environment alone


def _default_cpu_threads():
    n = _simulated_device_count()
    if n > 1 and "NPROC" not in os.environ and not _backends_started():
        os.environ["NPROC"] = str(max(os.cpu_count() or 1, interpret_threads_needed(n)))


_default_cpu_threads()


# ----------------------------------------------------------------------------- mesh helpers

def _axes(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _entry(axes):
    """A PartitionSpec entry: None, one name, or a tuple of names."""
    axes = _axes(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _size(mesh, axes) -> int:
    return int(np.prod([mesh.shape[a] for a in _axes(axes)], dtype=np.int64))


def _check_axes(mesh, named: dict):
    """named: {argument name: (axes, [(what, dim size)])}: unknown axes and non-dividing sizes raise."""
    used = {}
    for arg, (axes, dims) in named.items():
        for a in _axes(axes):
            if a not in mesh.shape:
                raise AttentionConfigError(f"{arg}={axes!r}: the mesh has no axis {a!r} (its axes: "
                                           f"{tuple(mesh.shape)})")
        n = _size(mesh, axes)
        for what, size in dims:
            if size % n:
                raise AttentionConfigError(
                    f"mesh axis {axes!r} of size {n} ({arg}) does not divide {what}={size}; "
                    "choose a mesh whose axis size divides it")
        for a in _axes(axes):
            if a in used and used[a] != arg and arg not in ("q_head_axes", "kv_head_axes"):
                raise AttentionConfigError(f"mesh axis {a!r} is used by both {used[a]} and {arg}")
            used.setdefault(a, arg)


def _is_trivial(mesh, *axes) -> bool:
    """No mesh, or every named axis has size 1 (unknown axis names raise)."""
    if mesh is None:
        return True
    for a in (name for group in axes for name in _axes(group)):
        if a not in mesh.shape:
            raise AttentionConfigError(f"the mesh has no axis {a!r} (its axes: {tuple(mesh.shape)})")
    return all(_size(mesh, a) == 1 for a in axes)


def _mesh_interpret(interpret):
    """A Mosaic TPU kernel's interpret mode inside a multi-device shard_map: True -> HLO_INTERPRET (see the module
    docstring); False, an explicit `pltpu.InterpretParams` or "hlo" unchanged."""
    return HLO_INTERPRET if interpret is True else interpret


def _uses_callback_interpreter(kernel: str, interpret) -> bool:
    """Whether the kernel ("tpu": a Mosaic TPU kernel; "gpu": the Mosaic GPU kernel) runs in an interpreter made of
    Python callbacks that synchronize the devices (after `_mesh_interpret`)."""
    if kernel == "gpu":
        return bool(interpret)
    return isinstance(interpret, pltpu.InterpretParams)


def _check_interpret_threads(mesh, callback_interpreter: bool):
    if not callback_interpreter:
        return
    devices = mesh.devices.flat
    n = mesh.devices.size
    if n <= 1 or next(iter(devices)).platform != "cpu":
        return
    threads = int(os.environ.get("NPROC") or os.cpu_count() or 1)
    if threads < interpret_threads_needed(n):
        raise AttentionConfigError(
            f"interpret-mode Pallas kernels on {n} CPU devices need at least {interpret_threads_needed(n)} CPU "
            f"client threads, but this process has {threads} (they would deadlock); set NPROC="
            f"{interpret_threads_needed(n)} or more in the environment before JAX starts")


def _check_same_head_axes(mesh, q_head_axes, kv_head_axes):
    """Query and kv heads split over the same mesh axes (or neither split), so each device holds whole GQA groups."""
    if _axes(q_head_axes) != _axes(kv_head_axes) and (_size(mesh, q_head_axes) > 1 or
                                                      _size(mesh, kv_head_axes) > 1):
        raise AttentionConfigError(
            f"q heads ({q_head_axes!r}) and kv heads ({kv_head_axes!r}) must be split over the same mesh axes")


def _shard_map(fn, mesh, in_specs, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ----------------------------------------------------------------------------- flash attention

def sharded_flash_attention(q, k, v, *, mesh, batch_axes=None, seq_axes=None, q_head_axes=None, kv_head_axes=None,
                            causal=True, segment_ids=None, positions=None, rope_theta=None, sm_scale=None,
                            implementation=None, interpret=False, seq_layout="contiguous",
                            block_size=DEFAULT_BLOCK_SIZE):
    """`kernels.flash_attention` (or `flash_attention_rope` when `rope_theta` is given) on a mesh.

    q [B, S, Hq, D], k/v [B, S, Hkv, D], segment_ids and positions [B, S] int. B is split over `batch_axes`,
    S over `seq_axes` (context parallelism when its size > 1; `seq_layout` "contiguous" or "zigzag", see
    `kernels.context_parallel`), query heads over `q_head_axes` and kv heads over `kv_head_axes` (the same
    axes: each device keeps whole GQA groups). Returns [B, S, Hq, D], sharded like q.
    """
    if implementation is None:
        implementation = default_implementation()
    if rope_theta is not None and positions is None:
        raise AttentionConfigError("rope_theta needs positions")

    def local_attention(q, k, v, seg, pos):
        if rope_theta is not None:
            return flash_attention_rope(q, k, v, pos, theta=rope_theta, causal=causal, segment_ids=seg,
                                        sm_scale=sm_scale, implementation=implementation, interpret=interpret)
        return flash_attention(q, k, v, causal=causal, segment_ids=seg, sm_scale=sm_scale,
                               implementation=implementation, interpret=interpret)

    if _is_trivial(mesh, batch_axes, seq_axes, q_head_axes, kv_head_axes):
        return local_attention(q, k, v, segment_ids, positions)

    b, s, hq, _ = q.shape
    hkv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, s):
        raise AttentionConfigError(f"q {q.shape} and k/v {k.shape}/{v.shape} must agree in batch and sequence")
    n_heads = _size(mesh, q_head_axes)
    if _axes(q_head_axes) != _axes(kv_head_axes) and (n_heads > 1 or _size(mesh, kv_head_axes) > 1):
        raise AttentionConfigError(
            f"q heads ({q_head_axes!r}) and kv heads ({kv_head_axes!r}) must be split over the same mesh axes, "
            "so that every device holds whole grouped-query groups")
    n_ctx = _size(mesh, seq_axes)
    if seq_layout not in context_parallel.SEQ_LAYOUTS:
        raise AttentionConfigError(f"seq_layout must be one of {context_parallel.SEQ_LAYOUTS}, got {seq_layout!r}")
    seq_multiple = 2 * n_ctx if (seq_layout == "zigzag" and n_ctx > 1) else n_ctx
    _check_axes(mesh, {
        "batch_axes": (batch_axes, [("batch", b)]),
        "seq_axes": (seq_axes, [("sequence length", s)] + ([("sequence length / 2 (zigzag chunks)", s // 2)]
                                                          if seq_multiple != n_ctx else [])),
        "q_head_axes": (q_head_axes, [("query heads", hq)]),
        "kv_head_axes": (kv_head_axes, [("kv heads", hkv)]),
    })
    if implementation == "pallas_tpu":
        interpret = _mesh_interpret(interpret)    # read by local_attention and the body below
    _check_interpret_threads(mesh, implementation in PALLAS_ATTENTION and _uses_callback_interpreter(
        "gpu" if implementation == "pallas_gpu" else "tpu", interpret))
    if n_ctx > 1 and implementation == "cudnn" and segment_ids is not None:
        raise AttentionConfigError("implementation='cudnn' does not support segment_ids")

    qspec = P(_entry(batch_axes), _entry(seq_axes), _entry(q_head_axes), None)
    kvspec = P(_entry(batch_axes), _entry(seq_axes), _entry(kv_head_axes), None)
    tok = P(_entry(batch_axes), _entry(seq_axes))
    has_seg, has_pos = segment_ids is not None, positions is not None
    args = [q, k, v] + ([segment_ids] if has_seg else []) + ([positions] if has_pos else [])
    specs = (qspec, kvspec, kvspec) + ((tok,) if has_seg else ()) + ((tok,) if has_pos else ())

    def body(q, k, v, *rest):
        rest = list(rest)
        seg = rest.pop(0) if has_seg else None
        pos = rest.pop(0) if has_pos else None
        if n_ctx == 1:
            return local_attention(q, k, v, seg, pos)
        if rope_theta is not None:
            rope_impl = "pallas" if implementation in PALLAS_ATTENTION else "xla"
            q = apply_rope(q, pos, theta=rope_theta, implementation=rope_impl, interpret=interpret)
            k = apply_rope(k, pos, theta=rope_theta, implementation=rope_impl, interpret=interpret)
        return context_parallel.context_parallel_attention(
            q, k, v, axis_name=_entry(seq_axes), axis_size=n_ctx, causal=causal, segment_ids=seg,
            sm_scale=sm_scale, seq_layout=seq_layout, block_size=block_size, implementation=implementation,
            interpret=interpret)

    return _shard_map(body, mesh, specs, qspec)(*args)


# ----------------------------------------------------------------------------- RoPE

def sharded_apply_rope(x, positions, *, mesh, batch_axes=None, seq_axes=None, head_axes=None, theta,
                       implementation=None, interpret=False):
    """`kernels.apply_rope` on a mesh: x [B, S, H, D] split over (batch_axes, seq_axes, head_axes), positions
    [B, S] over (batch_axes, seq_axes). RoPE is per token, so any split is exact."""
    rope = lambda x, pos: apply_rope(x, pos, theta=theta, implementation=implementation,  # noqa: E731
                                     interpret=interpret)
    if _is_trivial(mesh, batch_axes, seq_axes, head_axes):
        return rope(x, positions)
    b, s, h, _ = x.shape
    _check_axes(mesh, {"batch_axes": (batch_axes, [("batch", b)]),
                       "seq_axes": (seq_axes, [("sequence length", s)]),
                       "head_axes": (head_axes, [("heads", h)])})
    xspec = P(_entry(batch_axes), _entry(seq_axes), _entry(head_axes), None)
    return _shard_map(rope, mesh, (xspec, P(_entry(batch_axes), _entry(seq_axes))), xspec)(x, positions)


# ----------------------------------------------------------------------------- decode attention

def sharded_decode_attention(q, k_cache, v_cache, lengths, *, mesh, batch_axes=None, q_head_axes=None,
                             kv_head_axes=None, sm_scale=None, implementation=None, interpret=False):
    """`kernels.decode_attention` on a mesh: q [B, T, Hq, D] and the caches [B, C, Hkv, D] split over batch and
    heads (whole GQA groups per device), lengths [B] over batch. The cache length is not split."""
    decode = lambda q, kc, vc, n: decode_attention(q, kc, vc, n, sm_scale=sm_scale,  # noqa: E731
                                                    implementation=implementation, interpret=interpret)
    if _is_trivial(mesh, batch_axes, q_head_axes, kv_head_axes):
        return decode(q, k_cache, v_cache, lengths)
    _check_same_head_axes(mesh, q_head_axes, kv_head_axes)
    b, _, hq, _ = q.shape
    _check_axes(mesh, {"batch_axes": (batch_axes, [("batch", b)]),
                       "q_head_axes": (q_head_axes, [("query heads", hq)]),
                       "kv_head_axes": (kv_head_axes, [("kv heads", k_cache.shape[2])])})
    qspec = P(_entry(batch_axes), None, _entry(q_head_axes), None)
    cspec = P(_entry(batch_axes), None, _entry(kv_head_axes), None)
    return _shard_map(decode, mesh, (qspec, cspec, cspec, P(_entry(batch_axes))), qspec)(
        q, k_cache, v_cache, lengths)


# ----------------------------------------------------------------------------- paged attention

def sharded_paged_attention(q, k_pages, v_pages, block_tables, lengths, *, mesh, batch_axes=None, q_head_axes=None,
                            kv_head_axes=None, k_scales=None, v_scales=None, layer=None, sm_scale=None,
                            implementation=None, interpret=False):
    """`kernels.paged_attention` on a mesh: q [B, T, Hq, D] split over batch and heads (whole GQA groups per
    device), the page pool ([num_pages, page_size, Hkv, D], or [layers, ...] read at `layer`) and an int8 pool's
    scales ([.., num_pages, Hkv, page_size]) over kv heads only (pages are shared by all sequences, so every device
    keeps every page of its heads), block_tables [B, W] and lengths [B] over batch; `layer` (a scalar, possibly
    traced) is replicated."""
    quantized = k_scales is not None

    def paged(q, kp, vp, tables, n, *rest):
        scales, rest = (rest[:2], rest[2:]) if quantized else ((None, None), rest)
        return paged_attention(q, kp, vp, tables, n, k_scales=scales[0], v_scales=scales[1],
                               layer=rest[0] if rest else None, sm_scale=sm_scale,
                               implementation=implementation, interpret=interpret)

    extra = ((k_scales, v_scales) if quantized else ()) + (() if layer is None else (jnp.asarray(layer, jnp.int32),))
    if _is_trivial(mesh, batch_axes, q_head_axes, kv_head_axes):
        return paged(q, k_pages, v_pages, block_tables, lengths, *extra)
    _check_same_head_axes(mesh, q_head_axes, kv_head_axes)
    b, _, hq, _ = q.shape
    _check_axes(mesh, {"batch_axes": (batch_axes, [("batch", b)]),
                       "q_head_axes": (q_head_axes, [("query heads", hq)]),
                       "kv_head_axes": (kv_head_axes, [("kv heads", k_pages.shape[-2])])})
    if implementation in (None, "pallas"):           # the Mosaic TPU kernel (None picks it when interpreting)
        interpret = _mesh_interpret(interpret)       # read by paged() below
    _check_interpret_threads(mesh, implementation in (None, "pallas") and _uses_callback_interpreter("tpu",
                                                                                                      interpret))
    lead = (None,) * (k_pages.ndim - 2)                      # [layers,] pages, page rows: never split
    pspec = P(*lead, _entry(kv_head_axes), None)
    sspec = P(*lead[:-1], _entry(kv_head_axes), None)       # scales: [layers,] pages, kv heads, page rows
    qspec = P(_entry(batch_axes), None, _entry(q_head_axes), None)
    specs = ((qspec, pspec, pspec, P(_entry(batch_axes), None), P(_entry(batch_axes)))
             + ((sspec, sspec) if quantized else ()) + ((P(),) if layer is not None else ()))
    return _shard_map(paged, mesh, specs, qspec)(q, k_pages, v_pages, block_tables, lengths, *extra)
