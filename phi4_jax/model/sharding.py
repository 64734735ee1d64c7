"""Logical-axis sharding: one rules table from logical axis names to mesh axes.

Every parameter carries `logical_axes` (see `phi4_jax.model.decoder.param_specs`) and activations are annotated
with `constrain(x, logical_axes)`. Outside an `activation_sharding(mesh, rules)` context, `constrain` does
nothing, so the model runs unchanged on one device.

For training: `MeshConfig` / `build_mesh` (axes data, fsdp, context, tensor; ICI x DCN for multi-slice
pods and multi-node GPUs), `maybe_initialize_distributed`, the `TRAINING_RULES` table, and validators that
turn an unusable mesh into a `MeshError` naming the problem.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import kernels
from kernels.sharded import PALLAS_ATTENTION
from phi4_jax.checks import is_integer

_ACTIVE = contextvars.ContextVar("phi4_jax_sharding", default=None)


def logical_to_spec(logical_axes, rules) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names under `rules` ({logical: mesh axis or None})."""
    used, spec = set(), []
    for name in logical_axes:
        mesh_axes = rules.get(name)
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Within this context, `constrain` applies `rules` on `mesh` to activations."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def has_active_mesh() -> bool:
    """Whether an `activation_sharding` context is active (the program is partitioned over a mesh)."""
    return _ACTIVE.get() is not None


def _attention_mesh_axes(rules) -> dict:
    """The mesh axes of attention's dimensions under `rules`: batch, sequence, query heads and kv heads of
    q [batch, seq, q_heads, head_dim] and k/v [batch, seq, kv_heads, head_dim] (cache [.., batch, cache_seq,
    kv_heads, head_dim] splits batch and kv heads the same way)."""
    q = logical_to_spec(("batch", "seq", "q_heads", "head_dim"), rules)
    kv = logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rules)
    return {"batch_axes": q[0], "seq_axes": q[1], "q_head_axes": q[2], "kv_head_axes": kv[2]}


def sharded_attention_args(implementation):
    """Mesh and mesh axes for `kernels.sharded_flash_attention` under the active `activation_sharding`, from its rules.

    None when a plain call is right: no active mesh, or an XLA-partitionable implementation ("xla", "cudnn") with
    an unsplit sequence. Pallas kernels must sit in shard_map, and a split sequence needs context parallelism.
    """
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    axes = _attention_mesh_axes(rules)
    pallas = (implementation or kernels.default_implementation()) in PALLAS_ATTENTION
    if not pallas and mesh_axis_size(mesh, axes["seq_axes"]) == 1:
        return None
    return {"mesh": mesh, **axes}


def sharded_decode_args(implementation):
    """Mesh and mesh axes for `kernels.sharded_decode_attention` under the active `activation_sharding`, from its
    rules (the same derivation as `sharded_attention_args`): batch over the rules' batch axes, query and kv heads
    over theirs; the cache length is never split.

    `implementation` is `kernels.decode_attention`'s: None when a plain call is right: no active mesh, or "xla"
    (XLA partitions the reference itself). "pallas", and None (which picks the Pallas kernel on a TPU), get the
    shard_map wrapper: XLA cannot partition a Pallas call.
    """
    active = _ACTIVE.get()
    if active is None or implementation == "xla":
        return None
    mesh, rules = active
    axes = _attention_mesh_axes(rules)
    return {"mesh": mesh, "batch_axes": axes["batch_axes"], "q_head_axes": axes["q_head_axes"],
            "kv_head_axes": axes["kv_head_axes"]}


def sharded_paged_args(implementation, page_axes):
    """Mesh and mesh axes for `kernels.sharded_paged_attention` under the active `activation_sharding`, from its
    rules: q and the block tables / lengths split like `sharded_decode_args` says (batch, heads), and the page pool,
    whose logical axes are `page_axes` ([layers,] pages, page rows, kv heads, head_dim), split over its kv-head
    axes only, as the rules lay it out (a pool split along any other axis is refused: every device must hold
    whole pages of its heads).

    None when a plain call is right: no active mesh, or implementation "xla" (XLA partitions the gather-based
    reference itself). The Pallas kernels ("pallas", "pallas_gpu", and None, which picks the TPU kernel on a
    TPU) get the shard_map wrapper.
    """
    args = sharded_decode_args(implementation)
    if args is None:
        return None
    pool = logical_to_spec(page_axes, _ACTIVE.get()[1])
    split = [(name, axes) for name, axes in zip(page_axes, pool) if axes is not None and name != "kv_heads"]
    if split:
        raise MeshError(f"the paged attention kernels need the page pool split over kv heads only; the rules split "
                        f"{', '.join(f'{name} over {axes!r}' for name, axes in split)}")
    return {**args, "kv_head_axes": pool[page_axes.index("kv_heads")]}


def constrain(x, logical_axes):
    """Constrains activation x to the sharding its logical axes map to (no-op without an active mesh)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))


# ============================================================================= meshes and rules for training
#
# Sharding mode: every mesh axis is built as `AxisType.Auto` on purpose. The model annotates activations
# with `constrain` (with_sharding_constraint) and the train step pins params, optimizer state and batches
# with jit in/out shardings; XLA's partitioner propagates everything else. Explicit mode (the default of
# `jax.make_mesh` in JAX 0.10) would instead make sharding part of every array's type and require each op
# (e.g. an einsum contracting an fsdp-sharded dimension) to have an unambiguous output sharding at trace
# time, which the pure model functions are not written for.

MESH_AXES = ("data", "fsdp", "context", "tensor")

# One rules table: logical axis name -> mesh axis (or axes). Used for parameters, optimizer state
# (which mirrors the parameters), batches and activation constraints. `logical_to_spec` never uses one
# mesh axis twice in a spec, so activations [batch, seq, embed] get batch over (data, fsdp), seq over
# context and an unsharded embed, while parameter [vocab, embed] gets embed over fsdp and context
# (ZeRO-3 style weight sharding over every axis that does not split heads).
TRAINING_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": ("fsdp", "context"),  # the context axis also shards weights (it does not replicate state)
    "layers": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    # activations (embed, q_heads, kv_heads, head_dim, mlp as above)
    "batch": ("data", "fsdp"),
    "seq": "context",
}


class MeshError(ValueError):
    """A mesh that cannot be built, or that cannot shard this model / batch."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes within a slice/node (ICI) and across slices/nodes (DCN). -1 = fill with what is left.

    The devices of one TPU slice (or one GPU node) form the ICI mesh; `dcn_*` sizes multiply an axis
    across slices or nodes (put `data` or `fsdp` there: they communicate least).
    """

    data: int = 1
    fsdp: int = -1
    context: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_context: int = 1
    dcn_tensor: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "MeshConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MeshError(f"unknown mesh axis/axes {sorted(unknown)}; known: {sorted(names)}")
        for k, v in d.items():
            if not is_integer(v) or (v < 1 and v != -1):
                raise MeshError(f"mesh size {k}={v!r} must be a positive integer or -1 (fill)")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """'fsdp=8,tensor=2' -> MeshConfig (unnamed axes keep their defaults; fsdp defaults to fill)."""
        d = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise MeshError(f"mesh item {part!r} must look like AXIS=SIZE (e.g. fsdp=8)")
            try:
                d[name.strip()] = int(value)
            except ValueError:
                raise MeshError(f"mesh size for {name.strip()!r} must be an integer, got {value!r}") from None
        if "fsdp" not in d and any(v == -1 for v in d.values()):
            d["fsdp"] = 1  # another axis fills; fsdp would otherwise default to filling too
        return cls.from_dict(d)

    def ici_shape(self, n_devices: int) -> tuple[int, ...]:
        return _fill((self.data, self.fsdp, self.context, self.tensor), n_devices, "per-slice (ICI)")

    def dcn_shape(self, n_slices: int) -> tuple[int, ...]:
        return _fill((self.dcn_data, self.dcn_fsdp, self.dcn_context, self.dcn_tensor), n_slices,
                     "across-slice (DCN)")


def _fill(sizes, total, what) -> tuple[int, ...]:
    sizes = list(sizes)
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise MeshError(f"at most one {what} mesh axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if fills:
        if total % known:
            raise MeshError(f"{what} mesh {dict(zip(MESH_AXES, sizes))}: {total} devices are not divisible "
                            f"by the fixed axes' product {known}")
        sizes[fills[0]] = total // known
    if int(np.prod(sizes)) != total:
        raise MeshError(f"{what} mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                        f"but {total} are available")
    return tuple(sizes)


def _n_slices(devices) -> int:
    slice_ids = {getattr(d, "slice_index", 0) for d in devices}
    if len(slice_ids) > 1:
        return len(slice_ids)
    # multi-node GPU: one "slice" per process
    if devices[0].platform == "gpu":
        return len({d.process_index for d in devices})
    return 1


def build_mesh(mesh_config: MeshConfig | dict | str | None = None, devices=None) -> jax.sharding.Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'context', 'tensor'), all `AxisType.Auto`.

    Single slice/node: `mesh_utils.create_device_mesh` (topology-aware on TPU). Several TPU slices or GPU
    nodes: `create_hybrid_device_mesh`, with the `dcn_*` sizes across slices/nodes.
    """
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    if mesh_config is None:
        mesh_config = MeshConfig()
    elif isinstance(mesh_config, str):
        mesh_config = MeshConfig.parse(mesh_config)
    elif isinstance(mesh_config, dict):
        mesh_config = MeshConfig.from_dict(mesh_config)
    devices = list(devices if devices is not None else jax.devices())
    n_slices = _n_slices(devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if n_slices > 1:
        dcn = mesh_config.dcn_shape(n_slices)
        ici = mesh_config.ici_shape(len(devices) // n_slices)
        array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=devices[0].platform == "gpu")
    else:
        dcn = (mesh_config.dcn_data, mesh_config.dcn_fsdp, mesh_config.dcn_context, mesh_config.dcn_tensor)
        if any(s > 1 for s in dcn):
            raise MeshError(f"dcn_* mesh sizes {dict(zip(MESH_AXES, dcn))} need several slices/nodes; "
                            "this run has one")
        ici = mesh_config.ici_shape(len(devices))
        try:
            array = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):
            array = np.asarray(devices).reshape(ici)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Calls `jax.distributed.initialize()` for multi-host runs; returns whether it did.

    mode "auto": only when the environment says there are several processes (JAX_COORDINATOR_ADDRESS with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID, SLURM / Open MPI with more than one task, or a multi-host TPU
    slice). "always" / "never" force it.
    """
    if mode == "never":
        return False
    if mode not in ("auto", "always"):
        raise MeshError(f"distributed must be 'auto', 'always' or 'never', got {mode!r}")
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("MEGASCALE_NUM_SLICES", "1")) > 1
    )
    if mode == "always" or multi:
        # JAX reads JAX_COORDINATOR_ADDRESS itself; the process count and id we pass from the environment
        # (cluster auto-detection fills them on TPU pods, SLURM and Open MPI).
        kwargs = {}
        if "JAX_NUM_PROCESSES" in env:
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in env:
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)
        return True
    return False


def mesh_axis_size(mesh, mesh_axes) -> int:
    if mesh_axes is None:
        return 1
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return int(np.prod([mesh.shape[a] for a in mesh_axes]))


def named_sharding(mesh, logical_axes, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules or TRAINING_RULES))


def tree_shardings(mesh, logical_tree, rules=None):
    """Maps a tree whose leaves are logical-axes tuples to NamedShardings."""
    return jax.tree.map(lambda axes: named_sharding(mesh, axes, rules), logical_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def validate_model_mesh(model_config, mesh, rules=None) -> None:
    """Raises MeshError when the mesh's tensor / fsdp axes do not divide the dimensions they shard."""
    rules = rules or TRAINING_RULES
    dims = {
        "q_heads": ("num_heads", model_config.num_heads),
        "kv_heads": ("num_kv_heads", model_config.num_kv_heads),
        "mlp": ("intermediate_size", model_config.intermediate_size),
        "vocab": ("vocab_size", model_config.vocab_size),
        "embed": ("hidden_size", model_config.hidden_size),
    }
    for logical, (field, size) in dims.items():
        n = mesh_axis_size(mesh, rules.get(logical))
        if size % n:
            raise MeshError(
                f"mesh axis {rules.get(logical)!r} of size {n} does not divide {field}={size} "
                f"(logical axis {logical!r}); choose a size that divides it")


def validate_batch_mesh(mesh, batch_size: int, seq_len: int, rules=None, what="batch", hint="") -> None:
    """Raises MeshError when a [batch, seq] batch cannot be split over the data / context axes."""
    rules = rules or TRAINING_RULES
    nb = mesh_axis_size(mesh, rules.get("batch"))
    if batch_size % nb:
        raise MeshError(f"{what} size {batch_size} is not divisible by the data-parallel mesh axes "
                        f"{rules.get('batch')} (size {nb}){hint}")
    ns = mesh_axis_size(mesh, rules.get("seq"))
    if seq_len % ns:
        raise MeshError(f"sequence length {seq_len} is not divisible by the context mesh axis (size {ns})")
