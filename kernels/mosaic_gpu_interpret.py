"""The one place that touches JAX's private Mosaic GPU interpret mode.

Mosaic GPU kernels (`plgpu.kernel`) can run on a CPU under GPU interpret mode, which simulates SMEM,
TMA copies, barriers, warpgroup threads and `wgmma`. Its entry points live in the private module
`jax._src.pallas.mosaic_gpu.interpret`, which may move or vanish between JAX releases; everything else
in this project goes through the functions here, so such a change breaks one file with a clear message.
"""

from __future__ import annotations

import contextlib


class MosaicGPUInterpretUnavailable(RuntimeError):
    """This JAX build has no Mosaic GPU interpret mode (the private module moved or is missing)."""


def _params_module():
    try:
        from jax._src.pallas.mosaic_gpu.interpret import params  # noqa: PLC0415 (private, optional)
    except ImportError as e:
        import jax  # noqa: PLC0415

        raise MosaicGPUInterpretUnavailable(
            f"Mosaic GPU interpret mode is not available in jax {jax.__version__} "
            f"(jax._src.pallas.mosaic_gpu.interpret.params: {e}); run the Pallas GPU kernels on a GPU "
            "or use implementation='xla'") from e
    return params


def is_available() -> bool:
    """True when this JAX build can interpret Mosaic GPU kernels on a CPU."""
    try:
        _params_module()
    except MosaicGPUInterpretUnavailable:
        return False
    return True


def interpret_params(**kwargs):
    """An `InterpretGPUParams(**kwargs)` to pass as `plgpu.kernel(..., interpret=...)`."""
    return _params_module().InterpretGPUParams(**kwargs)


@contextlib.contextmanager
def force_interpret_mode(**kwargs):
    """Context manager: every Mosaic GPU kernel traced inside runs in GPU interpret mode."""
    params = _params_module()
    with params.force_gpu_interpret_mode(params.InterpretGPUParams(**kwargs)):
        yield


def races_found() -> bool:
    """Whether the race detector (`detect_races=True`) saw a data race since the last `reset_state`."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # noqa: PLC0415
    return bool(interpret_pallas_call.get_races().races_found)


def reset_state() -> None:
    """Clears the interpreter's global state; JAX requires this after a kernel raised while interpreted."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # noqa: PLC0415
    except ImportError:
        return
    interpret_pallas_call.reset_gpu_interpret_mode_state()
