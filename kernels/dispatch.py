"""Chooses and calls an attention / RoPE implementation, after checking the inputs.

Implementations of `flash_attention`:
- ``"xla"``: `kernels.attention_reference.attention_blockwise` (any backend, any float dtype; computes in the
  inputs' precision with an fp32 softmax).
- ``"pallas_tpu"``: `kernels.flash_attention_tpu` (Mosaic TPU).
- ``"pallas_gpu"``: `kernels.flash_attention_gpu` (Mosaic GPU, Hopper only; bf16/fp16 only: float32 is refused).
- ``"cudnn"``: `jax.nn.dot_product_attention(implementation="cudnn")`; bf16/fp16, no segment ids.

The default (`implementation=None`, `default_implementation`) is chosen by evidence: our own kernels become a
default only on hardware where they have been run and checked. `HARDWARE_RUNS` records those runs (device
kind, implementation, date, the BENCHMARKS.md entry holding the numbers). On a device the candidates are the
implementations with a recorded run there (fastest recorded first), then the vendor and reference paths that
need no record ("cudnn" on a GPU, then "xla"), keeping the first that takes the inputs (dtype, segment ids,
head_dim). Today no run of either Pallas kernel is recorded, so:
- GPU: "cudnn" for bf16/fp16 without segment ids (head_dim <= 128), else "xla"; "pallas_gpu" is opt-in.
- TPU: "xla". The Pallas TPU kernel is compiled by Mosaic for v4/v5e/v5p/v6e from a CPU host (libtpu,
  deviceless), which shows that it lowers, not that it runs correctly or fast there; "pallas_tpu" is opt-in.
- CPU: "xla".
Adding a row (e.g. `HardwareRun("H100", "pallas_gpu", ...)`) flips that device kind's default, for the inputs
the implementation takes. float32 inputs never get a bf16 path by default: neither Pallas GPU nor cuDNN takes
them, so they go to "xla" (or "pallas_tpu", fp32 throughout, once recorded).

`flash_attention_rope` is RoPE on q and k followed by attention; with "pallas_tpu" and "pallas_gpu" the rotation
is fused into the kernel's tile loads. `interpret=True` runs a Pallas implementation in interpret mode, so it works
on a CPU.
Inputs are validated here so a bad shape or dtype gets an error naming the constraint, not a backend crash.
NumPy inputs are accepted (converted to jax arrays first).
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp

from kernels.attention_reference import attention_blockwise
from kernels.rope_reference import apply_rope_reference

ATTENTION_IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu", "cudnn")
ROPE_IMPLEMENTATIONS = ("xla", "pallas")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class AttentionConfigError(ValueError):
    """Inputs or options that an attention / RoPE implementation cannot handle."""


HOPPER_NAMES = ("H100", "H200", "H800", "GH200")


def is_hopper_gpu(device) -> bool:
    """True for an NVIDIA Hopper GPU (sm_90: wgmma and TMA), the only GPU the Mosaic GPU kernel targets.

    The one Hopper test of the project (dispatch, the kernel's run-time guard, tests and benchmarks use it):
    the compute capability when the device reports one, else the device kind's name.
    """
    if getattr(device, "platform", None) != "gpu":
        return False
    capability = getattr(device, "compute_capability", None)
    if capability is not None:
        return str(capability).startswith("9.")
    kind = getattr(device, "device_kind", "") or ""
    return any(name in kind for name in HOPPER_NAMES)


@dataclasses.dataclass(frozen=True)
class HardwareRun:
    """One implementation run and checked on real hardware: its correctness tests passed on that device and its
    speed was measured (`tflops`: forward TFLOP/s at the BENCHMARKS.md entry's shapes; None if not measured)."""

    device_kind: str       # matched as a substring of `jax.Device.device_kind`, e.g. "H100", "TPU v5p"
    implementation: str    # one of ATTENTION_IMPLEMENTATIONS
    date: str              # ISO date of the run
    benchmarks_entry: str  # the BENCHMARKS.md section / heading with the run's numbers and command
    tflops: float | None = None


# Runs on real hardware that make an implementation eligible as a default there. Empty: neither Pallas kernel has
# been run on a GPU or TPU yet (BENCHMARKS.md, "Attention": "Status: no GPU numbers yet"). The change that
# records such a run appends its row here; that row alone flips the default for that device kind.
HARDWARE_RUNS: tuple[HardwareRun, ...] = ()

# Eligible without a recorded run (the vendor's kernel, the pure-JAX reference), in order of preference.
_UNRECORDED_DEFAULTS = {"gpu": ("cudnn", "xla"), "tpu": ("xla",), "cpu": ("xla",)}
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(implementation: str, *, dtype=jnp.bfloat16, segment_ids: bool = False, head_dim: int | None = None,
             device=None) -> bool:
    """Whether `implementation` takes inputs of this dtype, with or without segment ids, of this head_dim (None:
    not checked), on `device` (None: not checked)."""
    dtype = jnp.dtype(dtype)
    platform = getattr(device, "platform", None)
    if implementation == "xla":
        return True
    if implementation == "cudnn":
        return (dtype in _HALF_DTYPES and not segment_ids and platform in (None, "gpu")
                and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)))
    if implementation == "pallas_gpu":
        return (dtype in _HALF_DTYPES and (device is None or is_hopper_gpu(device))
                and (head_dim is None or (head_dim % 64 == 0 and 64 <= head_dim <= 256)))
    if implementation == "pallas_tpu":
        return (dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)) and platform in (None, "tpu")
                and (head_dim is None or head_dim % 64 == 0))
    return False


def recorded_runs(device) -> tuple[HardwareRun, ...]:
    """The HARDWARE_RUNS rows for this device's kind, fastest first (rows without a speed after the others)."""
    kind = getattr(device, "device_kind", "") or ""
    rows = [r for r in HARDWARE_RUNS if r.device_kind and r.device_kind in kind]
    return tuple(sorted(rows, key=lambda r: float("inf") if r.tflops is None else -r.tflops))


def default_implementation(backend: str | None = None, *, dtype=jnp.bfloat16, segment_ids: bool = False,
                           head_dim: int | None = None, device=None) -> str:
    """The attention implementation `flash_attention(implementation=None)` uses on `backend`'s first device.

    Recorded hardware runs on this device kind first (fastest first), then "cudnn" (GPU) and "xla": the first
    that takes inputs of `dtype`, with or without segment ids, of `head_dim` (None: not checked). Called with no
    inputs described, it answers for bf16 without segment ids. `device`: answer for this `jax.Device` instead of the
    backend's first one (e.g. a compile-only TPU device of a topology that this host compiles for). See the module
    docstring.
    """
    if device is None:
        device = jax.devices(backend)[0] if backend else jax.devices()[0]
    candidates = [run.implementation for run in recorded_runs(device)]
    candidates += _UNRECORDED_DEFAULTS.get(device.platform, ("xla",))
    for implementation in candidates:
        if supports(implementation, dtype=dtype, segment_ids=bool(segment_ids), head_dim=head_dim, device=device):
            return implementation
    return "xla"


def _check_attention_inputs(q, k, v, segment_ids):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise AttentionConfigError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if x.dtype not in _FLOAT_DTYPES:
            raise AttentionConfigError(f"{name} dtype {x.dtype} is not supported; use float32 or bfloat16")
    if k.shape != v.shape:
        raise AttentionConfigError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, s, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise AttentionConfigError(
            f"q {q.shape} and k/v {k.shape} must agree in batch, sequence length and head_dim")
    if hq % k.shape[2]:
        raise AttentionConfigError(
            f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]}) for grouped-query attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionConfigError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None:
        if segment_ids.shape != (b, s):
            raise AttentionConfigError(f"segment_ids must be [batch, seq] = {(b, s)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise AttentionConfigError(f"segment_ids must be integers, got {segment_ids.dtype}")


def _as_arrays(q, k, v, segment_ids):
    """NumPy (or other array-like) inputs as jax arrays, so every implementation and its autodiff can trace
    them (e.g. jax.grad of a function that closes over NumPy k and v)."""
    return (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
            None if segment_ids is None else jnp.asarray(segment_ids))


def _default_for(q, segment_ids):
    return default_implementation(dtype=q.dtype, segment_ids=segment_ids is not None, head_dim=q.shape[-1])


def _kernel_module(name: str):
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError as e:
        raise AttentionConfigError(f"attention kernel module kernels.{name} could not be imported: {e}") from e


def _cudnn_attention(q, k, v, *, causal, segment_ids, sm_scale):
    if segment_ids is not None:
        raise AttentionConfigError(
            "implementation='cudnn' does not support segment_ids (packed documents); "
            "use 'pallas_gpu' or 'xla'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise AttentionConfigError(f"implementation='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal, implementation="cudnn")


def flash_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, implementation=None,
                    interpret=False):
    """Multi-head attention with GQA, causal masking and packed-document segment ids.

    q [B, S, Hq, D]; k, v [B, S, Hkv, D] with Hq % Hkv == 0; segment_ids [B, S] int (0 = padding).
    Returns [B, S, Hq, D] in q's dtype. Differentiable. See the module docstring for implementations.
    """
    q, k, v, segment_ids = _as_arrays(q, k, v, segment_ids)
    _check_attention_inputs(q, k, v, segment_ids)
    if implementation is None:
        implementation = _default_for(q, segment_ids)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise AttentionConfigError(
            f"unknown attention implementation {implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "xla":
        return attention_blockwise(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)
    if implementation == "pallas_tpu":
        module = _kernel_module("flash_attention_tpu")
        return module.flash_attention_tpu(q, k, v, causal=causal, segment_ids=segment_ids,
                                          sm_scale=sm_scale, interpret=interpret)
    module = _kernel_module("flash_attention_gpu")
    return module.flash_attention_gpu(q, k, v, causal=causal, segment_ids=segment_ids,
                                      sm_scale=sm_scale, interpret=interpret)


def flash_attention_rope(q, k, v, positions, *, theta, causal=True, segment_ids=None, sm_scale=None,
                         implementation=None, interpret=False):
    """Attention of RoPE-rotated q and k: the same result as `apply_rope` on q and k, then `flash_attention`.

    positions [B, S] int, theta the RoPE base; other arguments as in `flash_attention`. With "pallas_tpu" or
    "pallas_gpu" the rotation is fused into the kernel's q/k tile loads (forward and backward, so rotated q/k never go
    through HBM); the other implementations rotate with the XLA reference first, then attend.
    """
    q, k, v, segment_ids = _as_arrays(q, k, v, segment_ids)
    positions = jnp.asarray(positions)
    _check_attention_inputs(q, k, v, segment_ids)
    if positions.shape != q.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise AttentionConfigError(
            f"positions must be integer [batch, seq] = {q.shape[:2]}, got {positions.dtype}{list(positions.shape)}")
    if implementation is None:
        implementation = _default_for(q, segment_ids)
    if implementation == "pallas_tpu":
        module = _kernel_module("flash_attention_tpu")
        return module.flash_attention_tpu(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                                          interpret=interpret, rope=(positions, theta))
    if implementation == "pallas_gpu":
        module = _kernel_module("flash_attention_gpu")
        return module.flash_attention_gpu(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                                          interpret=interpret, rope=(positions, theta))
    q = apply_rope_reference(q, positions, theta=theta)
    k = apply_rope_reference(k, positions, theta=theta)
    return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                           implementation=implementation, interpret=interpret)


def apply_rope(x, positions, *, theta, implementation=None, interpret=False):
    """Rotary embedding (NeoX rotate-half) of x [B, S, H, D] at integer positions [B, S]; fp32 angles."""
    if x.ndim != 4:
        raise AttentionConfigError(f"x must be [batch, seq, heads, head_dim], got shape {x.shape}")
    if x.shape[-1] % 2:
        raise AttentionConfigError(f"head_dim must be even for rotate-half RoPE, got {x.shape[-1]}")
    if positions.shape != x.shape[:2]:
        raise AttentionConfigError(f"positions must be [batch, seq] = {x.shape[:2]}, got {positions.shape}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise AttentionConfigError(f"positions must be integers, got {positions.dtype}")
    if implementation is None:
        implementation = "pallas" if interpret else "xla"
    if implementation not in ROPE_IMPLEMENTATIONS:
        raise AttentionConfigError(
            f"unknown RoPE implementation {implementation!r}; choose one of {ROPE_IMPLEMENTATIONS}")
    if implementation == "xla":
        return apply_rope_reference(x, positions, theta=theta)
    module = _kernel_module("rope_pallas")
    return module.apply_rope_pallas(x, positions, theta=theta, interpret=interpret)
