"""Reading a checkpoint back: `restore_params` (onto any shardings, in any dtype) and `load_model`."""

from __future__ import annotations

import os
from typing import Any

from phi4_jax.checkpoint.store import (
    CheckpointError,
    check_chunk_files,
    check_params_metadata,
    params_directory,
    read_checkpoint_config,
)
from phi4_jax.model.config import DTYPES, ConfigError, Phi4Config

ShardingSpec = Any  # pytree of jax.sharding.Sharding, or callable(path, shape, logical_axes) -> Sharding


def _resolve_dtype(dtype) -> str | None:
    if dtype is None:
        return None
    import jax.numpy as jnp

    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported parameter dtype {name!r}: use one of {', '.join(DTYPES)}")
    return name


def _target_shardings(config: Phi4Config, sharding: ShardingSpec):
    """A pytree of shardings matching `param_specs`."""
    import jax

    from phi4_jax.model.decoder import is_param_spec as is_spec
    from phi4_jax.model.decoder import param_specs

    specs = param_specs(config)
    if sharding is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: device, specs, is_leaf=is_spec)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda s: sharding, specs, is_leaf=is_spec)
    if callable(sharding):
        return jax.tree_util.tree_map_with_path(
            lambda kp, s: sharding(tuple(k.key for k in kp), s[0], s[1]), specs, is_leaf=is_spec)
    return sharding


def restore_params(path: str | os.PathLike, config: Phi4Config | None = None, *, dtype=None,
                   sharding: ShardingSpec = None) -> dict:
    """Restores the nested params dict of a checkpoint with Orbax, cast to `dtype` (None: as stored), placed
    on `sharding` (None: the first device; a Sharding for all; a pytree; or callable(path, shape, axes))."""
    stored_config, meta = read_checkpoint_config(path)
    return _restore(params_directory(path, meta), config or stored_config, dtype, sharding)


def _restore(params_dir, config: Phi4Config, dtype, sharding: ShardingSpec) -> dict:
    import jax
    import orbax.checkpoint as ocp

    stored = check_params_metadata(params_dir, config)
    check_chunk_files(params_dir, stored)
    shardings = _target_shardings(config, sharding)
    dtype_name = _resolve_dtype(dtype)

    def target(kp, shard):
        key = tuple(k.key for k in kp)
        leaf_dtype = dtype_name or stored[key].dtype
        return jax.ShapeDtypeStruct(tuple(stored[key].shape), leaf_dtype, sharding=shard)

    try:
        abstract = jax.tree_util.tree_map_with_path(target, shardings)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"sharding does not match the parameter tree: {e}") from None
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        return ocp.PyTreeCheckpointer().restore(
            params_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
    except Exception as e:  # tensorstore / orbax errors for missing or corrupt array files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"corrupt or incomplete checkpoint {str(params_dir)!r}: {first}") from None


def load_model(path: str | os.PathLike, dtype=None, *, sharding: ShardingSpec = None,
               compute_dtype=None, **config_overrides: Any):
    """Loads a converted checkpoint as a `Phi4ForCausalLM`.

    `dtype` casts the parameters (e.g. ``jnp.bfloat16`` for inference; None keeps the stored dtype).
    `compute_dtype` defaults to the parameter dtype (float32 params compute in float32, so fp32 parity with
    transformers holds; bf16 params compute in bf16). `sharding`: see `restore_params`. Other keyword
    arguments override runtime config fields (e.g. ``attention_impl="xla"``, ``remat_policy="none"``).
    """
    from phi4_jax.model.decoder import model_from_params

    dtype_name = _resolve_dtype(dtype)
    stored_config, meta = read_checkpoint_config(path)
    param_dtype = dtype_name or meta.get("param_dtype", stored_config.param_dtype)
    compute = _resolve_dtype(compute_dtype) or param_dtype
    runtime = {"param_dtype": param_dtype, "compute_dtype": compute}
    runtime.update(config_overrides)
    try:
        config = stored_config.replace(**runtime)
    except ConfigError as e:
        raise CheckpointError(f"bad config override: {e}") from None
    params = _restore(params_directory(path, meta), config, param_dtype, sharding)
    return model_from_params(config, params)
