"""LoRA: low-rank adapters on the attention and MLP projections, trained while the base weights stay frozen.

A targeted weight W (q/k/v/o, gate/up/down; stacked over layers) becomes ``LoraWeight(base=W, a=A, b=B)``, and
`phi4_jax.model.linear` computes ``x @ W + (alpha / rank) * (x @ A) @ B`` through its ``linear_einsum``. A holds
W's input axes then the rank, B the rank then W's output axes, both with the stacked ``layers`` axis first, so the
decoder's `lax.scan` slices them like plain weights. A starts random (std 1/sqrt(fan-in)), B at zero, so an
untrained adapter leaves the model unchanged.

Why not qwix's LoRA (checked, qwix 0.1): `qwix.LoraProvider` intercepts `dot_general`/`einsum` calls made inside
Flax module methods and finds the weight as an attribute of the current module (`getattr(module, name)`), adding
``<name>_lora_a/_lora_b`` variables there. Our decoder is pure functions over a stacked parameter dict run by
`lax.scan` (the NNX module only holds that dict), so there is no per-layer module to intercept and the
adapters could not get the stacked layers axis; a weight object at the one `linear` seam is a few lines instead.

Training (`[lora] rank > 0` in the train config): the train state's ``params`` are the adapters only (so only
they get AdamW moments), and ``frozen`` holds the base weights in `lora.base_dtype` (bf16 on accelerators).
Checkpoints hold the adapters, their optimizer state and the step, not the base: each step stores a reference to
it instead (`FrozenBase.reference`: the absolute `train.init_from` path, or none for a seeded init, and a content
fingerprint of the weights as trained on). Resume and merge reload the base the same way and refuse one whose
fingerprint differs (the adapters only fit the base they were trained on).
`merge_params` folds the adapters back into plain weights;
``python -m phi4_jax.posttrain.merge_lora WORKDIR DST`` writes the merged model as a normal checkpoint, which
`convert_weights.py --to-hf` exports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import string
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from phi4_jax.model import sharding
from phi4_jax.model.decoder import logical_axes_tree, param_specs
from phi4_jax.train.config import LORA_TARGETS

# input axes of each target's (per-layer) weight; the remaining axes are its outputs
_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen weight plus a low-rank update: ``base + scale * A @ B`` (A: input axes + rank, B: rank +
    output axes). Leaves keep the stacked layers axis first; `scale` is static."""
    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})

    def linear_einsum(self, equation: str, x, compute_dtype, **einsum_kwargs):
        """``einsum(equation, x, base) + scale * einsum(einsum(x, A), B)``, in the compute dtype."""
        inputs, out = equation.replace(" ", "").split("->")
        x_sub, w_sub = inputs.split(",")
        if "." in equation:
            raise ValueError(f"LoRA weights take explicit einsum subscripts, got {equation!r}")
        w_in = [c for c in w_sub if c in x_sub]
        w_out = [c for c in w_sub if c not in x_sub]
        r = next(c for c in string.ascii_letters if c not in equation)
        keep = "".join(c for c in out if c not in w_out)     # the batch-like axes x keeps
        y = jnp.einsum(equation, x, self.base.astype(compute_dtype), **einsum_kwargs)
        xa = jnp.einsum(f"{x_sub},{''.join(w_in)}{r}->{keep}{r}", x, self.a.astype(compute_dtype))
        delta = jnp.einsum(f"{keep}{r},{r}{''.join(w_out)}->{out}", xa, self.b.astype(compute_dtype), **einsum_kwargs)
        return y + (self.scale * delta).astype(y.dtype)


def check_targets(targets) -> tuple[str, ...]:
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"lora.targets must be a non-empty subset of {LORA_TARGETS}, got {list(targets)}")
    return tuple(targets)


def adapter_specs(config, rank: int, targets=LORA_TARGETS) -> dict:
    """{"layers": {target: {"a": (shape, axes), "b": (shape, axes)}}}: shapes and logical axes of the adapters
    (the rank axis is unsharded; the others follow the base weight's)."""
    layers = param_specs(config)["layers"]
    out = {}
    for name in check_targets(targets):
        shape, axes = layers[name]
        k = 1 + _INPUT_AXES[name]   # layers axis + input axes
        out[name] = {"a": ((*shape[:k], rank), (*axes[:k], None)),
                     "b": ((shape[0], rank, *shape[k:]), (axes[0], None, *axes[k:]))}
    return {"layers": out}


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def init_adapters(config, rank: int, targets, key) -> dict:
    """Fresh float32 adapters: A ~ N(0, 1/fan_in), B = 0 (an identity update)."""
    specs = adapter_specs(config, rank, targets)
    names = sorted(specs["layers"])
    keys = dict(zip(names, jax.random.split(key, len(names))))
    out = {}
    for name in names:
        (a_shape, _), (b_shape, _) = specs["layers"][name]["a"], specs["layers"][name]["b"]
        fan_in = int(np.prod(a_shape[1:-1]))
        out[name] = {"a": jax.random.normal(keys[name], a_shape, jnp.float32) / np.sqrt(fan_in),
                     "b": jnp.zeros(b_shape, jnp.float32)}
    return {"layers": out}


def attach(base_params: dict, adapters: dict, scale: float) -> dict:
    """The model's params with each adapted weight a `LoraWeight` (the rest as they are)."""
    layers = dict(base_params["layers"])
    for name, ab in adapters["layers"].items():
        layers[name] = LoraWeight(layers[name], ab["a"], ab["b"], scale)
    return {**base_params, "layers": layers}


def delta(a, b, scale: float):
    """scale * A @ B with the rank contracted: [L, in..., out...] (float32)."""
    a2 = a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32)
    b2 = b.reshape(b.shape[0], b.shape[1], -1).astype(jnp.float32)
    return scale * jnp.einsum("lir,lro->lio", a2, b2).reshape(*a.shape[:-1], *b.shape[2:])


def merge_params(base_params: dict, adapters: dict, scale: float, dtype=None) -> dict:
    """Plain parameters: each adapted W replaced by W + scale * A @ B (computed in float32, cast to `dtype`,
    default the base's)."""
    layers = dict(base_params["layers"])
    for name, ab in adapters["layers"].items():
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + delta(ab["a"], ab["b"], scale)).astype(dtype or w.dtype)
    return {**base_params, "layers": layers}


# ----------------------------------------------------------------------------- training with frozen base weights

def _abstract(tree_of_specs, dtype, shardings):
    return jax.tree.map(lambda spec, sh: jax.ShapeDtypeStruct(spec[0], dtype, sharding=sh), tree_of_specs,
                        shardings, is_leaf=_is_spec)


_HASH_MUL = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))


def _leaf_hash(x):
    """uint32: the sum (mod 2^32) over elements of a mix of each element's bits and its index. Integer sums do
    not depend on reduction order, so any sharding of the same weights gives the same value."""
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    bits = bits.astype(jnp.uint32)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(stride % 2**32)
        stride *= x.shape[d]
    v = bits ^ (index * _HASH_MUL[0])
    v = (v ^ (v >> 16)) * _HASH_MUL[1]
    v = (v ^ (v >> 13)) * _HASH_MUL[2]
    return jnp.sum(v ^ (v >> 16), dtype=jnp.uint32)


_leaf_hashes = jax.jit(lambda tree: jax.tree.map(_leaf_hash, tree))


def base_fingerprint(base: dict) -> str:
    """A hex content fingerprint of a params tree (names, shapes, dtypes and every weight's bits)."""
    hashes = jax.device_get(_leaf_hashes(base))
    h = hashlib.sha256()
    for (path, leaf), value in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(hashes)):
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}:{int(value)};".encode())
    return h.hexdigest()[:24]


class FrozenBase(NamedTuple):
    """A LoRA run's frozen base weights, which checkpoints reference instead of storing.

    `load(key, init_from)`: the base on its shardings in `lora.base_dtype`, from `init_from` (a converted
    checkpoint or a train.py workdir) or, without one, a fresh init from `key` (the run's seed)."""
    load: Callable

    @staticmethod
    def reference(base: dict, init_from) -> dict:
        """What a checkpoint stores about the base: its source and its content fingerprint."""
        return {"init_from": os.path.abspath(init_from) if init_from else None,
                "fingerprint": base_fingerprint(base)}

    def reload(self, saved: dict | None, key, init_from, *, where: str) -> tuple[dict, dict]:
        """(base, its reference): the base loaded again from `init_from` (or `key`), checked against the reference
        `saved` with checkpoint `where`; a different base (or none saved) is a TrainCheckpointError."""
        from phi4_jax.train.checkpoints import TrainCheckpointError

        if not saved or "fingerprint" not in saved:
            raise TrainCheckpointError(f"{where} has no reference to its LoRA base weights (saved by an older "
                                       "version that stored the base itself?); start a new workdir")
        source = init_from or "a fresh init from train.seed"
        base = self.load(key, init_from)
        now = self.reference(base, init_from)
        if now["fingerprint"] != saved["fingerprint"]:
            trained_on = saved.get("init_from") or "a fresh init from train.seed"
            raise TrainCheckpointError(
                f"{where}: its LoRA adapters were trained on base weights {trained_on} (fingerprint "
                f"{saved['fingerprint']}), but {source} now gives different weights (fingerprint "
                f"{now['fingerprint']}); point train.init_from at the original base, or start a new workdir")
        return base, now


def build_lora_train_step(config, mesh, lora, *, optimizer, total_steps: int, micro_batches: int, loss_chunk: int,
                          objective):
    """(step_fn, StepShardings, abstract state, tx, create_state, FrozenBase) for LoRA training
    (`phi4_jax.train.loop.BuiltStep`'s fields). State: {"step", "params": adapters (float32), "opt_state" (AdamW
    over the adapters only), "frozen": base weights in `lora.base_dtype`, never checkpointed};
    `create_state(key, init_from)` loads the base from `init_from` (or initializes it from `key`) and starts the
    adapters from `key`."""
    from phi4_jax.train.optimizer import make_optimizer
    from phi4_jax.train.step import StepShardings, make_train_step

    rules = sharding.TRAINING_RULES
    specs = adapter_specs(config, lora.rank, lora.targets)
    adapter_sh = sharding.tree_shardings(mesh, jax.tree.map(lambda s: s[1], specs, is_leaf=_is_spec), rules)
    base_sh = sharding.tree_shardings(mesh, logical_axes_tree(config), rules)
    tx, schedule = make_optimizer(optimizer, config, total_steps,
                                  decay_mask=jax.tree.map(lambda _: True, specs, is_leaf=_is_spec))
    rep = sharding.replicated(mesh)
    abstract_adapters = _abstract(specs, jnp.float32, adapter_sh)
    abstract_opt = jax.eval_shape(tx.init, abstract_adapters)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, adapter_sh, transform_non_params=lambda _: rep)
    base_dtype = jnp.dtype(lora.base_dtype)
    shardings = StepShardings(state={"step": rep, "params": adapter_sh, "opt_state": opt_sh, "frozen": base_sh},
                              batch=sharding.named_sharding(mesh, ("batch", "seq"), rules), params=adapter_sh,
                              replicated=rep)
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), "params": abstract_adapters,
        "opt_state": jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_opt, opt_sh),
        "frozen": _abstract(param_specs(config), base_dtype, base_sh)}
    scale = lora.scale
    step_fn = make_train_step(config, tx, schedule, micro_batches=micro_batches, loss_chunk=loss_chunk, mesh=mesh,
                              shardings=shardings, objective=objective,
                              combine=lambda adapters, base: attach(base, adapters, scale))

    frozen_base = FrozenBase(load_base(config, lora, base_sh))

    def create_state(key, init_from=None):
        base = frozen_base.load(key, init_from)
        adapters = jax.jit(lambda k: init_adapters(config, lora.rank, lora.targets, k), out_shardings=adapter_sh)(key)
        return {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "params": adapters,
                "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(adapters), "frozen": base}

    return step_fn, shardings, abstract_state, tx, create_state, frozen_base


def load_base(config, lora, base_sh):
    """`FrozenBase.load` for a model and LoRA config on the base shardings `base_sh`."""
    from phi4_jax.train.checkpoints import init_params_from
    from phi4_jax.train.step import init_params

    base_dtype = jnp.dtype(lora.base_dtype)

    def load(key, init_from=None):
        if init_from:
            base = init_params_from(init_from, config, base_sh)
            return jax.jit(lambda p: jax.tree.map(lambda w: w.astype(base_dtype), p), out_shardings=base_sh)(base)
        return jax.jit(lambda k: jax.tree.map(lambda w: w.astype(base_dtype), init_params(config, k)),
                       out_shardings=base_sh)(jax.random.fold_in(key, 1))

    return load


# ----------------------------------------------------------------------------- export: merge into a plain checkpoint

def restore_lora_run(workdir: str, mesh=None):
    """(TrainConfig, base params, adapters) of the newest checkpoint of a LoRA train.py workdir (a partial
    restore: the optimizer state stays on disk), on `mesh` (default: all local devices, fsdp). The base is
    reloaded from where the run loaded it (the checkpoint's reference) and checked against its fingerprint."""
    import json

    from phi4_jax.train.checkpoints import TrainCheckpointError, restore_latest_state
    from phi4_jax.train.config import build_train_config

    config_path = os.path.join(workdir, "config.json")
    try:
        with open(config_path) as f:
            cfg = build_train_config(json.load(f))
    except (OSError, ValueError) as e:
        raise TrainCheckpointError(f"{workdir!r} is not a train.py workdir: cannot read {config_path}: {e}") from None
    if not cfg.lora.rank:
        raise TrainCheckpointError(f"{workdir!r} is not a LoRA run (lora.rank = 0 in its config.json); its "
                                   "checkpoints already hold plain weights")
    mesh = mesh or sharding.build_mesh(sharding.MeshConfig.parse("fsdp=-1"))
    rules = sharding.TRAINING_RULES
    specs = adapter_specs(cfg.model, cfg.lora.rank, cfg.lora.targets)
    abstract = {"params": _abstract(specs, jnp.float32, sharding.tree_shardings(
                    mesh, jax.tree.map(lambda s: s[1], specs, is_leaf=_is_spec), rules))}
    state, saved = restore_latest_state(os.path.abspath(workdir), abstract, what="merge_lora",
                                        with_base_reference=True)
    frozen = FrozenBase(load_base(cfg.model, cfg.lora,
                                  sharding.tree_shardings(mesh, logical_axes_tree(cfg.model), rules)))
    base, _ = frozen.reload(saved, jax.random.key(cfg.train.seed), (saved or {}).get("init_from"),
                            where=f"merge_lora {workdir!r}")
    return cfg, base, state["params"]


def write_merged_checkpoint(cfg, base: dict, adapters: dict, dst, *, dtype: str = "float32", overwrite: bool = False,
                            progress: bool = True):
    """Writes base + adapters, merged layer by layer (`merge_params`' arithmetic), as a model checkpoint at `dst`
    (the `convert_weights.py` format: `load_model`, `convert_weights.py --to-hf` and `train.init_from` read it),
    atomically. Host memory holds one layer's merged weight at a time."""
    from phi4_jax.checkpoint import store
    from phi4_jax.model.decoder import flat_param_specs

    out_dtype = np.dtype(jnp.dtype(dtype))
    config = cfg.model.replace(param_dtype=out_dtype.name)
    specs = {path: (shape, out_dtype) for path, (shape, _) in flat_param_specs(config).items()}
    scale = cfg.lora.scale
    merge_layer = jax.jit(lambda w, a, b: (w.astype(jnp.float32)
                                           + delta(a[None], b[None], scale)[0]).astype(out_dtype))
    items = list(specs)
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc=f"merging LoRA into {os.fspath(dst)}", unit=" tensor", dynamic_ncols=True)
    with store.atomic_directory(dst, overwrite=overwrite) as tmp:
        writer = store.ParamArrayWriter(tmp / store.PARAMS_DIR, specs)
        for path in items:
            w = base[path[0]] if len(path) == 1 else base[path[0]][path[1]]
            if path[0] == "layers" and path[1] in adapters["layers"]:
                ab = adapters["layers"][path[1]]
                for layer in range(w.shape[0]):
                    writer.write(path, np.asarray(merge_layer(w[layer], ab["a"][layer], ab["b"][layer])), (layer,))
            else:
                writer.write(path, np.asarray(jax.device_get(w)).astype(out_dtype))
        writer.finish()
        store.write_checkpoint_config(tmp, config, param_dtype=out_dtype.name, source_dtype=cfg.lora.base_dtype)
    return dst


def merge_main(argv=None) -> int:
    """python -m phi4_jax.posttrain.merge_lora WORKDIR DST [--dtype float32|bfloat16] [--overwrite]"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m phi4_jax.posttrain.merge_lora",
                                description="Merge a LoRA run's adapters into its base weights: a plain checkpoint.")
    p.add_argument("workdir", help="the LoRA run's train.py workdir (its newest checkpoint is merged)")
    p.add_argument("dst", help="output checkpoint directory (then: convert_weights.py --to-hf DST HF_DIR)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the merged weights (default float32: a bf16 base plus a small update loses it "
                        "in bf16 rounding)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from phi4_jax.checkpoint.store import CheckpointError
    from phi4_jax.train.checkpoints import TrainCheckpointError

    try:
        cfg, base, adapters = restore_lora_run(args.workdir)
        out = write_merged_checkpoint(cfg, base, adapters, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                      progress=not args.no_progress)
    except (TrainCheckpointError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint: {out}")
    return 0
