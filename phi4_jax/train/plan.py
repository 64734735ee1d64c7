"""Ahead-of-time memory plan of the full training step for a model, mesh, sequence length and batch.

Compiles the real train step (the one `train.py` runs: AdamW, clipping, accumulation, chunked loss, remat)
with abstract arrays (`jax.ShapeDtypeStruct` + shardings; no weights allocated) and prints the per-device
memory the compiler plans for it (`compiled.memory_analysis()`): arguments, outputs, aliased (donated) bytes,
temporaries. The last line is ``peak_bytes_per_device=N`` with N = arguments + outputs - aliased +
temporaries.

The devices are whatever the caller passes: the host's devices (simulated CPU devices in the CLI), or the
compile-only devices of a TPU topology (`tpu_topology_devices`, e.g. "v5p:2x2x2"). For the latter the real
TPU compiler in the `libtpu` wheel compiles the program on this CPU machine; no TPU is needed. The attention
implementation is chosen explicitly (`choose_attention`: `kernels.default_implementation` / `kernels.dispatch.supports`
for the target device) and printed as ``attention=<implementation>``, so the compiled program is the one the run
would use on that hardware, not the host's default. Pallas kernels sit in the shard_map wrappers of
`kernels.sharded` (the model calls them on a mesh), so "pallas_tpu" compiles for a sharded TPU step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re

# HBM per chip (GiB) of the TPU generations a topology name can start with.
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
# Generations whose chips are two TensorCores shown as one device (megacore): accelerator names count cores.
_MEGACORE = ("v4", "v5p")
_MOSAIC_PARTITION_ERROR = "cannot be automatically partitioned"


class PlanError(ValueError):
    """A plan that cannot be made as asked (no libtpu, unknown topology, attention that cannot compile there)."""


class DoesNotFitError(PlanError):
    """The compiler refused the program because it needs more memory than a device has (the TPU compiler checks
    its plan against the chip's HBM)."""


def parse_mesh_size(text: str) -> int:
    """The product of the positive sizes in a mesh spec like "data=2,fsdp=4" (0 if a size is not a number)."""
    size = 1
    for part in filter(None, (p.strip() for p in text.split(","))):
        _, _, value = part.partition("=")
        try:
            n = int(value)
        except ValueError:
            return 0
        if n > 0:
            size *= n
    return size


# ----------------------------------------------------------------------------- TPU topologies (compile-only)

def _topology_generation(name: str) -> tuple[str, list[int]]:
    match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name.strip())
    if not match:
        raise PlanError(f"TPU topology {name!r} must look like GENERATION:AxB[xC], e.g. v5p:2x2x2 or v6e:2x4")
    return match.group(1), [int(n) for n in match.group(2).split("x")]


def tpu_hbm_bytes(topology: str) -> int | None:
    """HBM per chip of a topology's TPU generation, or None when it is not in `TPU_HBM_GIB`."""
    gib = TPU_HBM_GIB.get(_topology_generation(topology)[0])
    return None if gib is None else gib * 2**30


def _libtpu_environment(topology: str) -> None:
    """Environment libtpu reads when it starts, for a compile-only process (existing values are kept).

    Another process (a second plan, a test worker) may hold libtpu's lock file although nothing runs on a TPU,
    so loading it more than once is allowed; the worker list and accelerator name stop libtpu's start-up from
    probing a cloud metadata server (it logs errors when there is none).
    """
    generation, dims = _topology_generation(topology)
    chips = math.prod(dims)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{generation}-{chips * (2 if generation in _MEGACORE else 1)}")


def _jax_libtpu_pin():
    """The libtpu requirement of the installed jax's `tpu` extra (jax 0.10.2: libtpu==0.0.42.*), or None."""
    from importlib import metadata

    from packaging.requirements import Requirement

    for text in metadata.requires("jax") or ():
        req = Requirement(text)
        if req.name == "libtpu" and req.marker is not None and req.marker.evaluate({"extra": "tpu"}):
            return req
    return None


def _check_libtpu_matches_jax() -> None:
    """Raises PlanError when the installed libtpu is not the version jax's `tpu` extra pins (a libtpu built for
    another jaxlib can fail to load or compile differently)."""
    from importlib import metadata

    pin = _jax_libtpu_pin()
    installed = metadata.version("libtpu")
    if pin is not None and not pin.specifier.contains(installed, prereleases=True):
        raise PlanError(f"libtpu {installed} does not match jax {metadata.version('jax')}, which needs "
                        f"libtpu{pin.specifier}: pip install -e '.[tpu-aot]'")


def tpu_topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU topology (e.g. "v5p:2x2x2": 8 chips) from the `libtpu` wheel.

    Nothing runs on them: `jax.jit(f).lower(...)` on arrays sharded over them, then `.compile()`, runs the real
    TPU compiler on this machine. Raises PlanError when libtpu is missing or the name is not a topology.
    """
    _topology_generation(topology)
    if importlib.util.find_spec("libtpu") is None:
        from importlib import metadata

        pin = _jax_libtpu_pin()
        raise PlanError(f"--topology needs the libtpu wheel that matches jax {metadata.version('jax')} "
                        f"(libtpu{pin.specifier if pin else ''}): pip install -e '.[tpu-aot]'")
    _check_libtpu_matches_jax()
    _libtpu_environment(topology)
    import jax
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except (jax.errors.JaxRuntimeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"libtpu cannot make TPU topology {topology!r}: {first}") from None


# ----------------------------------------------------------------------------- attention and compilation

def choose_attention(device, requested: str | None = None, *, dtype="bfloat16", head_dim: int | None = None) -> str:
    """The attention implementation to compile for `device`: `requested`, else the run's default there.

    The default is `kernels.default_implementation` for that device (a compile-only TPU device included), not
    for the host that compiles, and for inputs of `dtype` and `head_dim` (the model's compute dtype and head
    size). Raises PlanError for an implementation that `kernels.dispatch.supports` says cannot run there.
    """
    import jax.numpy as jnp

    from kernels import dispatch

    implementation = requested or dispatch.default_implementation(device=device, dtype=dtype, head_dim=head_dim)
    if not dispatch.supports(implementation, dtype=dtype, head_dim=head_dim, device=device):
        usable = [i for i in dispatch.ATTENTION_IMPLEMENTATIONS
                  if dispatch.supports(i, dtype=dtype, head_dim=head_dim, device=device)]
        raise PlanError(f"attention {implementation!r} cannot run on {device.platform} devices "
                        f"({device.device_kind}) with {jnp.dtype(dtype).name} inputs"
                        f"{'' if head_dim is None else f' and head_dim {head_dim}'}; choose one of {usable}")
    return implementation


@contextlib.contextmanager
def lowering_target(mesh):
    """Lowers for the mesh's devices: with compile-only TPU devices, the kernels' backend checks
    (`kernels.pallas_compat.on_tpu`) see the TPU through the mesh's abstract mesh, not the host's CPU."""
    import jax

    if mesh.devices.flat[0].platform == jax.default_backend():
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def compile_for(mesh, jitted, *args, attention: str = "xla"):
    """`jitted.lower(*args).compile()` for the mesh's devices. A Mosaic kernel that XLA would have to partition
    becomes a one-line PlanError, a program larger than the device's memory a DoesNotFitError."""
    import jax

    try:
        with lowering_target(mesh):
            lowered = jitted.lower(*args)
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e).strip()
        if not message.startswith("RESOURCE_EXHAUSTED"):
            raise
        raise DoesNotFitError(f"does not fit on {mesh.devices.flat[0].device_kind}: the compiler says "
                              f"{message.splitlines()[0]}") from None
    except NotImplementedError as e:
        if _MOSAIC_PARTITION_ERROR not in str(e):
            raise
        raise PlanError(
            f"{attention}: a Pallas kernel outside the shard_map wrappers of kernels/sharded.py reached XLA's "
            f"partitioner, which cannot split a Mosaic kernel over the {dict(mesh.shape)} mesh; use --attention xla"
        ) from None


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of a compiled program (`compiled.memory_analysis()`)."""
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def peak(self) -> int:
        """Arguments + outputs - aliased (donated inputs reused for outputs) + temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @classmethod
    def of(cls, compiled) -> "MemoryPlan":
        mem = compiled.memory_analysis()
        return cls(arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
                   aliased=int(mem.alias_size_in_bytes), temporaries=int(mem.temp_size_in_bytes),
                   code=int(getattr(mem, "generated_code_size_in_bytes", 0) or 0))


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


# ----------------------------------------------------------------------------- the plan

def train_step_program(config, mesh, *, global_batch: int, seq_len: int, micro_batches: int = 1,
                       loss_chunk: int = 1024, lora=None):
    """The jitted train step and its abstract arguments (state, batch) on `mesh`, ready to lower: the step
    `train.py` runs (AdamW, clipping, accumulation, chunked loss, remat), with nothing allocated.

    Raises MeshError when the mesh cannot shard the model or the (micro-)batch. With `lora` (a LoraConfig with
    rank > 0) it is the LoRA SFT step: adapters trained, base weights frozen in `lora.base_dtype`.
    """
    import jax
    import jax.numpy as jnp

    from phi4_jax.model import sharding
    from phi4_jax.train.config import OptimizerConfig
    from phi4_jax.train.loop import build_train_step
    from phi4_jax.train.step import BATCH_KEYS

    if global_batch % micro_batches:
        raise sharding.MeshError(f"--global-batch {global_batch} is not divisible by --micro-batches {micro_batches}")
    sharding.validate_batch_mesh(mesh, global_batch // micro_batches, seq_len, what="micro-batch")
    keys = BATCH_KEYS
    objective = {}
    if lora is not None and lora.rank:
        from phi4_jax.posttrain.objectives import SFT

        keys, objective = tuple(SFT.batch_keys), {"objective": SFT, "lora": lora}
    built = build_train_step(config, mesh, optimizer=OptimizerConfig(), total_steps=100_000,
                             micro_batches=micro_batches, loss_chunk=min(loss_chunk, seq_len), **objective)
    batch = {k: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=built.shardings.batch)
             for k in keys}
    return built.step_fn, built.abstract_state, batch


def plan(args, devices=None, topology: str | None = None) -> int:
    """Compiles the train step for `args` (the CLI's options) on `devices` (default: `jax.devices()`) and prints
    the per-device memory plan; `topology` names the TPU topology the devices come from. Returns 0, or 3 when
    the planned peak exceeds the topology's HBM per chip (the compiler checks only part of it)."""
    import time

    import jax

    from phi4_jax.model import sharding
    from phi4_jax.model.config import get_preset

    devices = list(devices if devices is not None else jax.devices())
    changes = {"remat_policy": args.remat, "max_position_embeddings": max(args.seq_len, 1)}
    if args.rope_theta:
        changes["rope_theta"] = args.rope_theta
    config = get_preset(args.model, **changes)
    attention = choose_attention(devices[0], args.attention, dtype=config.compute_dtype, head_dim=config.head_dim)
    config = config.replace(attention_impl=attention)
    wanted = parse_mesh_size(args.mesh)
    if "=-1" not in args.mesh.replace(" ", "") and 0 < wanted < len(devices):
        devices = devices[:wanted]  # more devices than the mesh needs (e.g. XLA_FLAGS set elsewhere)
    mesh = sharding.build_mesh(sharding.MeshConfig.parse(args.mesh), devices=devices)
    loss_chunk = min(args.loss_chunk, args.seq_len)
    lora = None
    if getattr(args, "lora_rank", 0):
        from phi4_jax.train.config import LoraConfig

        lora = LoraConfig(rank=args.lora_rank, base_dtype=args.lora_base_dtype)
    step, state, batch = train_step_program(config, mesh, global_batch=args.global_batch, seq_len=args.seq_len,
                                            micro_batches=args.micro_batches, loss_chunk=loss_chunk, lora=lora)
    device = devices[0]
    where = (f"{mesh.size} {device.device_kind} devices of TPU topology {topology} (compile-only, libtpu)"
             if topology else f"{mesh.size} {device.platform} devices")
    print(f"model {args.model}: {config.num_params / 1e9:.2f}B params, {config.num_layers} layers | "
          f"mesh {dict(mesh.shape)} on {where} | seq {args.seq_len} | "
          f"global batch {args.global_batch} x {args.micro_batches} micro-batches | remat {args.remat} | "
          f"loss chunk {loss_chunk}" + (f" | LoRA SFT rank {lora.rank} on {', '.join(lora.targets)}, base frozen "
                                         f"in {lora.base_dtype}" if lora else ""), flush=True)
    print(f"attention={attention}", flush=True)
    t0 = time.perf_counter()
    mem = MemoryPlan.of(compile_for(mesh, step, state, batch, attention=attention))
    print(f"compiled in {time.perf_counter() - t0:.1f} s; per-device memory:")
    print(f"  arguments    {_gib(mem.arguments)}  (train state shard + batch)")
    print(f"  outputs      {_gib(mem.outputs)}")
    print(f"  aliased      {_gib(mem.aliased)}  (donated state reused for the outputs)")
    print(f"  temporaries  {_gib(mem.temporaries)}  (activations, gradients, optimizer update)")
    if mem.code:
        print(f"  code         {_gib(mem.code)}")
    print(f"  peak         {_gib(mem.peak)}")
    hbm = tpu_hbm_bytes(topology) if topology else None
    fits = hbm is None or mem.peak <= hbm
    if hbm:
        print(f"  {'fits' if fits else 'does NOT fit'} in {hbm / 2**30:.0f} GiB of HBM per "
              f"{topology.split(':')[0]} chip")
    print(f"peak_bytes_per_device={mem.peak}")
    return 0 if fits else 3
