"""Small shared helpers for the Pallas kernels: interpret-mode parameters, backend checks, lane rolls, RoPE tiles.

Kept in one place so version differences of `jax.experimental.pallas` (checked with JAX 0.10.2) are handled once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from kernels.dispatch import AttentionConfigError


class PallasUnavailableError(AttentionConfigError):
    """A Pallas kernel was asked to run where it cannot (no matching accelerator and no interpret mode)."""


def on_tpu() -> bool:
    """True when compiling for a TPU: the default backend is one, or an abstract mesh with a TPU abstract
    device is active (`jax.sharding.use_abstract_mesh`, used to lower for TPU from a CPU host)."""
    abstract_device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if abstract_device is not None:
        return abstract_device.platform == "tpu"
    return jax.default_backend() == "tpu"


def tpu_target(device_kind: str = "TPU v5p", num_cores: int = 1):
    """Context manager to lower Mosaic TPU kernels from a host without a TPU (e.g. `jax.export` with
    platforms=["tpu"]): an abstract mesh whose abstract device is the given TPU."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


# `interpret=HLO_INTERPRET`: a Mosaic TPU kernel's body lowered to ordinary XLA ops (JAX's HLO interpreter).
HLO_INTERPRET = "hlo"


def tpu_interpret_params(interpret, *, detect_races: bool = False):
    """Maps the public `interpret` flag to what `pl.pallas_call(interpret=...)` needs for a Mosaic TPU kernel.

    - False -> False: compile with Mosaic (a TPU must be present).
    - True -> `pltpu.InterpretParams()`: the TPU interpreter, which simulates VMEM, DMAs and semaphores on a CPU
      (and detects races when asked). It runs the kernel as Python callbacks that synchronize every device of an
      enclosing shard_map, so in a multi-device program it can deadlock (see `kernels.sharded`).
    - An `InterpretParams` is passed through.
    - `HLO_INTERPRET` ("hlo") -> True: JAX's HLO interpreter, which lowers the kernel body to ordinary XLA ops (a
      loop over the grid, scratch as arrays). Same arithmetic, no callbacks, no cross-device synchronization: what
      `kernels.sharded` uses on a mesh. It does not simulate DMA timing and cannot detect races.
    """
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    if isinstance(interpret, str):
        if interpret != HLO_INTERPRET:
            raise AttentionConfigError(f"interpret={interpret!r}: use a bool, a pltpu.InterpretParams or "
                                       f"{HLO_INTERPRET!r}")
        return True
    if interpret:
        return pltpu.InterpretParams(detect_races=detect_races)
    if not on_tpu():
        raise PallasUnavailableError(
            f"the Mosaic TPU kernel needs a TPU backend (found {jax.default_backend()!r}); "
            "pass interpret=True to run it on CPU")
    return False


def races_found() -> bool | None:
    """Whether the TPU interpreter's race detector (InterpretParams(detect_races=True)) reported a race in the
    kernels run since `pltpu.reset_tpu_interpret_mode_state()`; None if no interpreted kernel has run."""
    from jax._src.pallas.mosaic.interpret import (
        interpret_pallas_call as tpu_interpret,  # private, 0.10.x
    )

    state = getattr(tpu_interpret, "races", None)
    return None if state is None else bool(state.races_found)


def lane_roll(x, shift: int, *, tpu: bool):
    """jnp.roll(x, shift, axis=-1) with a non-negative static shift; `pltpu.roll` (a native lane rotate) on TPU."""
    shift = shift % x.shape[-1]
    if shift == 0:
        return x
    if tpu:
        return pltpu.roll(x, shift, x.ndim - 1)
    return jnp.roll(x, shift, axis=-1)


def rotate_half_lanes(x, head_dim: int, *, tpu: bool):
    """NeoX rotate_half applied per head to a tile whose last axis holds whole heads of `head_dim` lanes.

    For each head [x1, x2] -> [-x2, x1], built from lane rolls (no lane slicing, which Mosaic handles poorly
    for half-vreg offsets).
    """
    half = head_dim // 2
    width = x.shape[-1]
    lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first_half = (lane % head_dim) < half
    from_right = lane_roll(x, width - half, tpu=tpu)  # lane j <- x[j + half]
    if width == head_dim:
        return jnp.where(first_half, -from_right, from_right)
    from_left = lane_roll(x, half, tpu=tpu)           # lane j <- x[j - half]
    return jnp.where(first_half, -from_right, from_left)


def rope_cos_sin(positions_col, inv_freq_row, *, inverse: bool = False):
    """cos and sin [rows, D] of angles positions [rows, 1] (int) * inv_freq [1, D] (float32, concat(f, f)).

    `inverse=True` negates sin: the rotation by -angle, which is RoPE's backward.
    """
    angles = positions_col.astype(jnp.float32) * inv_freq_row
    sin = jnp.sin(angles)
    return jnp.cos(angles), (-sin if inverse else sin)


def rotate_with(x, cos, sin, head_dim: int, *, tpu: bool):
    """x [rows, D] rotated by cos/sin [rows, D] in float32 (NeoX rotate-half); returns float32."""
    xf = x.astype(jnp.float32)
    return xf * cos + rotate_half_lanes(xf, head_dim, tpu=tpu) * sin


def rope_tile(x, positions_col, inv_freq_row, head_dim: int, *, inverse: bool = False, tpu: bool):
    """Rotates one head's tile x [rows, head_dim] (float32 math) by angles positions * inv_freq."""
    cos, sin = rope_cos_sin(positions_col, inv_freq_row, inverse=inverse)
    return rotate_with(x, cos, sin, head_dim, tpu=tpu)


# ------------------------------------------------------------------ GPU-only kernels: decided by the target

_NEEDS = {True: "a Hopper GPU (CUDA sm_90: wgmma, TMA)", False: "an NVIDIA GPU (CUDA)"}


def _target_error(where: str, what: str, hopper: bool) -> PallasUnavailableError:
    return PallasUnavailableError(
        f"{what} needs {_NEEDS[hopper]}, but {where}; on a CPU pass interpret=True "
        f"({'Mosaic GPU' if hopper else 'Pallas'} interpret mode), or use implementation='xla'")


def _local_gpu():
    """The first local GPU device, or None when this process has no GPU backend (e.g. a CPU host that
    exports for CUDA)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    return devices[0] if devices else None


def _fits(device, hopper: bool) -> bool:
    from kernels.dispatch import is_hopper_gpu

    return is_hopper_gpu(device) if hopper else device.platform == "gpu"


def _gpu_guard_impl(x, *, what, hopper):
    # Run eagerly: it executes on the default device right now, so that device must be a fitting GPU.
    device = jax.devices()[0]
    if not _fits(device, hopper):
        raise _target_error(f"it would run eagerly on {device.device_kind!r} ({device.platform})", what, hopper)
    return x


def _gpu_guard_lowering_other(ctx, x, *, what, hopper):
    platforms = getattr(ctx.module_context, "platforms", None) or ("?",)
    raise _target_error(f"it is being lowered for {', '.join(platforms)}", what, hopper)


def _gpu_guard_lowering_cuda(ctx, x, *, what, hopper):
    gpu = _local_gpu()
    # No local GPU: an ahead-of-time lowering (jax.export for "cuda" on a CPU host).
    if gpu is not None and not _fits(gpu, hopper):
        raise _target_error(f"this process's GPU is {gpu.device_kind!r}", what, hopper)
    return [x]


def _make_gpu_guard():
    from jax.extend.core import Primitive
    from jax.interpreters import batching, mlir

    prim = Primitive("phi4_gpu_target_guard")
    prim.def_impl(_gpu_guard_impl)
    prim.def_abstract_eval(lambda aval, **_: aval)
    mlir.register_lowering(prim, _gpu_guard_lowering_other)
    mlir.register_lowering(prim, _gpu_guard_lowering_cuda, platform="cuda")
    batching.primitive_batchers[prim] = lambda args, dims, **params: (prim.bind(*args, **params), dims[0])
    return prim


_gpu_guard_p = _make_gpu_guard()


def require_hopper_target(x, *, what: str = "the Mosaic GPU kernel"):
    """Identity on x that refuses, with a `PallasUnavailableError`, to run or lower anywhere but a Hopper GPU.

    The check follows the lowering target, not the default backend: lowered for "cuda" it passes (so
    `jax.export(..., platforms=["cuda"])` works on a CPU host; Mosaic GPU targets sm_90a) unless this process's
    own GPU is not a Hopper; lowered for any other platform (jit on a CPU, TPU, ROCm) it raises; run eagerly, the
    default device must be a Hopper GPU. Feed a kernel's first operand through it so the check comes first.
    """
    return _gpu_guard_p.bind(x, what=what, hopper=True)


def require_gpu_target(x, *, what: str = "the Pallas Triton kernel"):
    """`require_hopper_target` for kernels that run on any CUDA GPU (the Triton backend): lowered for "cuda" it
    passes; for any other platform, or run eagerly off a GPU, it raises `PallasUnavailableError`."""
    return _gpu_guard_p.bind(x, what=what, hopper=False)
