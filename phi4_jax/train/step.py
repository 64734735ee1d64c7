"""The train state and the jitted (pjit) train step.

Train state: a plain pytree ``{"step": int32[], "params": fp32 master weights, "opt_state": optax state}``.
Parameters are created directly with their shardings (jit with out_shardings), so the full model is never
materialized on one device. The step casts weights to the compute dtype (bf16 compute with fp32 master
weights, fp32 loss), accumulates gradients over micro-batches, and applies the optimizer, under jit with
explicit in/out shardings and a donated state.

Gradient accumulation is exact: each micro-batch contributes the gradient of its summed loss, and the total is
divided once by the number of trained tokens of the whole batch, so it is the same update as one big batch (up
to float rounding).

The objective is pluggable (`Objective`): pretraining's next-token loss by default; post-training's SFT and DPO
objectives (`phi4_jax.posttrain.objectives`) bring their own batch keys and loss through the same step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.model.decoder import init_param, is_param_spec, logical_axes_tree, param_specs
from phi4_jax.train.loss import loss_sum_and_count

BATCH_KEYS = ("input_ids", "segment_ids", "positions")
BATCH_AXES = ("batch", "seq")


class Objective(NamedTuple):
    """What a train step minimizes. `batch_keys`: {name: ndim}, 2 for [G, S] arrays sharded like the tokens,
    1 for per-row [G] arrays. `loss(params, batch, config, chunk) -> (total, count, sums)`: the summed loss of a
    (micro-)batch, what it is averaged over (trained tokens, or pairs), and extra metrics as sums over the same
    units; the step reports loss = total / count and each sum / count."""
    batch_keys: dict
    loss: Callable


def _pretrain_loss(params, batch, config, chunk):
    total, count = loss_sum_and_count(params, batch, config, chunk)
    return total, count, {}


PRETRAIN = Objective({name: 2 for name in BATCH_KEYS}, _pretrain_loss)


def batch_shardings(objective: Objective, shardings: "StepShardings") -> dict:
    """{name: NamedSharding} of an objective's batch: [G, S] arrays like the tokens, [G] arrays by row."""
    row = jax.sharding.NamedSharding(shardings.batch.mesh, jax.sharding.PartitionSpec(shardings.batch.spec[0]))
    return {name: shardings.batch if ndim == 2 else row for name, ndim in objective.batch_keys.items()}


def init_params(config: Phi4Config, key):
    """Fresh parameters (Phi-3 style init) as a nested dict, in `config.param_dtype`."""
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_param_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(config.param_dtype)
    return jax.tree.unflatten(treedef, [init_param(k, shape, axes, dtype)
                                        for k, (shape, axes) in zip(keys, leaves)])


def new_train_state(params, tx):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


@dataclasses.dataclass(frozen=True)
class StepShardings:
    state: Any      # tree of NamedSharding matching the train state
    batch: Any      # NamedSharding of every [batch, seq] batch array
    params: Any
    replicated: Any


def train_state_shardings(mesh, config: Phi4Config, tx, rules=None) -> StepShardings:
    """Declared shardings: params from the rules table, optimizer moments like their params, scalars replicated."""
    rules = rules or sharding.TRAINING_RULES
    param_sh = sharding.tree_shardings(mesh, logical_axes_tree(config), rules)
    rep = sharding.replicated(mesh)
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], jnp.dtype(config.param_dtype)),
                                   param_specs(config), is_leaf=is_param_spec)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, param_sh,
                                   transform_non_params=lambda _: rep)
    state = {"step": rep, "params": param_sh, "opt_state": opt_sh}
    return StepShardings(state=state, batch=sharding.named_sharding(mesh, BATCH_AXES, rules),
                         params=param_sh, replicated=rep)


def abstract_train_state(config: Phi4Config, tx, shardings: StepShardings | None = None):
    """The train state as ShapeDtypeStructs (with shardings when given): for AOT compile and restore."""
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], jnp.dtype(config.param_dtype)),
                                   param_specs(config), is_leaf=is_param_spec)
    abstract = jax.eval_shape(lambda p: new_train_state(p, tx), abstract_params)
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        abstract, shardings.state)


def create_train_state(config: Phi4Config, tx, shardings: StepShardings, key, params=None):
    """A train state created already sharded: a fresh init from `key`, or around `params`.

    Given `params` (e.g. from `init_params_from`, already on `shardings.params` in `config.param_dtype`), they
    are used as they are (placed once: only arrays on another sharding or dtype are moved) and the optimizer
    state is built by a jitted `tx.init` straight onto its shardings."""
    if params is None:
        fn = jax.jit(lambda k: new_train_state(init_params(config, k), tx),
                     out_shardings=shardings.state)
        return fn(key)
    dtype = jnp.dtype(config.param_dtype)

    def place(p, sh):
        if isinstance(p, jax.Array) and p.dtype == dtype and p.sharding.is_equivalent_to(sh, p.ndim):
            return p
        return jax.device_put(jnp.asarray(p, dtype), sh)

    params = jax.tree.map(place, params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.state["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.replicated)
    return {"step": step, "params": params, "opt_state": opt_state}


def make_train_step(config: Phi4Config, tx, schedule: Callable, *, micro_batches: int, loss_chunk: int,
                    mesh, shardings: StepShardings, rules=None, donate: bool = True,
                    objective: Objective = PRETRAIN, combine: Callable | None = None):
    """jit(step)(state, batch) -> (state, metrics). batch: {input_ids, segment_ids, positions} [G, S] int32
    (pretraining; another `objective` names its own keys).

    metrics (float32 scalars): loss (mean over trained tokens, or the objective's units), grad_norm (before
    clipping), lr (of this step), tokens (the loss's count: trained tokens, or pairs), batch_tokens (the
    non-padding tokens the step ran the model on), and the objective's own.

    `combine(trainable, frozen) -> model params`, for a state with a ``"frozen"`` entry that is not trained
    (LoRA: adapters + frozen base weights); gradients and optimizer state cover ``state["params"]`` only.
    """
    rules = rules or sharding.TRAINING_RULES
    k = int(micro_batches)

    def grad_of(params, batch, frozen=None):
        def f(p):
            total, count, sums = objective.loss(p if combine is None else combine(p, frozen), batch, config,
                                                loss_chunk)
            return total, (count, sums)
        (total, (count, sums)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return total, count, sums, grads

    def step(state, batch):
        with sharding.activation_sharding(mesh, rules):
            params, frozen = state["params"], state.get("frozen")
            if k == 1:
                total, count, sums, grads = grad_of(params, batch, frozen)
            else:
                def split(x):
                    g = x.shape[0]
                    # micro-batch m = rows m, m+k, m+2k, ...: each keeps its share of every data shard
                    x = jnp.swapaxes(x.reshape(g // k, k, *x.shape[1:]), 0, 1)
                    return sharding.constrain(x, (None, *BATCH_AXES[:x.ndim - 1]))
                micro = {name: split(batch[name]) for name in objective.batch_keys}

                def body(carry, mb):
                    tot, cnt, sm, acc = carry
                    t, c, s, g = grad_of(params, mb, frozen)
                    return (tot + t, cnt + c, jax.tree.map(jnp.add, sm, s), jax.tree.map(jnp.add, acc, g)), None

                zeros = jax.tree.map(jnp.zeros_like, params)
                zero_sums = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
                    lambda: grad_of(params, jax.tree.map(lambda x: x[0], micro), frozen)[2]))
                (total, count, sums, grads), _ = jax.lax.scan(
                    body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_sums, zeros), micro)
            denom = jnp.maximum(count, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            grads = jax.lax.with_sharding_constraint(grads, shardings.params)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            # tokens the forward pass ran on (not padding; every [G, S] "*segment_ids" of the batch): tokens/s, MFU
            real = sum(jnp.sum(batch[name] != 0, dtype=jnp.float32) for name in objective.batch_keys
                       if name.endswith("segment_ids"))
            metrics = {"loss": total / denom, "grad_norm": grad_norm,
                       "lr": jnp.asarray(schedule(state["step"]), jnp.float32), "tokens": count,
                       "batch_tokens": real,
                       **{name: value / denom for name, value in sums.items()}}
            new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
            if frozen is not None:
                new_state["frozen"] = frozen
            return new_state, metrics

    batch_sh = batch_shardings(objective, shardings)
    return jax.jit(step, in_shardings=(shardings.state, batch_sh),
                   out_shardings=(shardings.state, shardings.replicated),
                   donate_argnums=(0,) if donate else ())
