"""Interpret mode or the real device for the kernel tests, decided in one place from the environment.

By default every Pallas kernel test runs in interpret mode (it works on a CPU). On a GPU or TPU machine,
`PHI4_KERNEL_TESTS_ON_DEVICE=1` (set by `bench/gpu_suite.py`) makes the kernel tests run the compiled
kernels on that device instead, against the same pure-JAX references and tolerances.

Use in a test file:

    from kernel_mode import interpret_for   # tests/ is on sys.path under pytest, as for hf_models
    out = flash_attention_gpu(q, k, v, interpret=interpret_for("gpu"))

`interpret_for(backend)` names the hardware the kernel is written for: "gpu" (Mosaic GPU), "tpu" (Mosaic
TPU), or "any" (a backend-neutral `pl.pallas_call`, compiled by whichever accelerator is present). It returns
False (compile for the device) only when the switch is on and the present device can run that kernel;
otherwise True, so a TPU kernel's tests stay interpreted on a GPU machine. With the switch on and no
accelerator at all, `KernelModeError` is raised: a "real hardware" run must not silently interpret.
"""

from __future__ import annotations

import os

ON_DEVICE_ENV = "PHI4_KERNEL_TESTS_ON_DEVICE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
BACKENDS = ("gpu", "tpu", "any")


class KernelModeError(RuntimeError):
    """The on-device switch is malformed, or it is on but no accelerator is present."""


def on_device_requested() -> bool:
    """Whether PHI4_KERNEL_TESTS_ON_DEVICE asks for compiled kernels on the real device."""
    value = os.environ.get(ON_DEVICE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise KernelModeError(f"{ON_DEVICE_ENV}={os.environ[ON_DEVICE_ENV]!r} is not a boolean; use 1 or 0")


def device_platform() -> str:
    import jax  # noqa: PLC0415 (imported late: the env decides the mode before any backend work)

    return jax.devices()[0].platform


def interpret_for(backend: str) -> bool:
    """True to interpret the kernel written for `backend` ("gpu", "tpu", "any"), False to compile it."""
    if backend not in BACKENDS:
        raise KernelModeError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if not on_device_requested():
        return True
    platform = device_platform()
    if platform not in ("gpu", "tpu"):
        raise KernelModeError(f"{ON_DEVICE_ENV} is set but JAX's device is {platform!r}: the compiled kernels "
                              "need a GPU or TPU (unset it to run the tests in interpret mode)")
    return not (backend == "any" or backend == platform)


def mode_name() -> str:
    """'device (<platform>)' or 'interpret', for test ids and reports."""
    return f"device ({device_platform()})" if on_device_requested() else "interpret"
