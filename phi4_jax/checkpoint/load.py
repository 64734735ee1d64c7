"""Reading a checkpoint back: `restore_params` (onto any shardings, in any dtype; quantized tensors kept or
dequantized) and `load_model`."""

from __future__ import annotations

import os
from pathlib import Path
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
    on `sharding` (None: the first device; a Sharding for all; a pytree; or callable(path, shape, axes)).

    A checkpoint holding quantized tensors (``convert_weights.py X.gguf DST --keep-quantized``) gives, with
    ``dtype=None``, `phi4_jax.quant.QuantizedWeight` leaves for them (scales and the float parameters in the
    checkpoint's parameter dtype; one device: `sharding` must be None), the tree `load_model` runs; with a float
    `dtype` every quantized tensor is dequantized (in float32, then cast), one at a time, and placed like a plain
    checkpoint's parameters."""
    stored_config, meta = read_checkpoint_config(path)
    if meta.get("quantized"):
        return _restore_quantized(params_directory(path, meta), config or stored_config, meta, dtype, sharding)
    return _restore(params_directory(path, meta), config or stored_config, dtype, sharding)


def _restore_quantized(params_dir, config: Phi4Config, meta: dict, dtype, sharding: ShardingSpec) -> dict:
    import jax
    import jax.numpy as jnp

    from phi4_jax.checkpoint.quantized_load import assemble, checkpoint_sources, load_params
    from phi4_jax.quant.weights import QuantizationError, QuantizedWeight

    sources = checkpoint_sources(params_dir, config, meta)
    dtype_name = _resolve_dtype(dtype)
    if dtype_name is None:
        _check_unsharded(sharding)
        return load_params(sources, None, meta.get("param_dtype", config.param_dtype), progress=False)
    shardings = _target_shardings(config, sharding)
    params: dict = {"layers": {}}
    for source in sources:
        try:
            leaf = assemble(source, None, "float32")
        except QuantizationError as e:
            raise CheckpointError(str(e)) from None
        if isinstance(leaf, QuantizedWeight):
            leaf = leaf.dequantize(jnp.float32, name=source.name)
        path = source.path
        try:
            shard = shardings[path[0]] if len(path) == 1 else shardings[path[0]][path[1]]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"sharding does not match the parameter tree: {e}") from None
        value = jax.device_put(leaf.astype(dtype_name), shard)
        del leaf
        (params["layers"] if path[0] == "layers" else params)[path[-1]] = value
    return params


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


def load_model(path: str | os.PathLike, dtype=None, *, quantize: str | None = None, group_size: int | None = None,
               quantize_embed: str | None = "int8", quantize_lm_head: bool = True, sharding: ShardingSpec = None,
               compute_dtype=None, progress: bool = False, check_tokenizer: bool = True, **config_overrides: Any):
    """Loads a converted checkpoint (or a llama.cpp phi3 ``.gguf`` file) as a `Phi4ForCausalLM`.

    `dtype` casts the parameters (e.g. ``jnp.bfloat16`` for inference; None keeps the stored dtype; a GGUF file
    defaults to float32). `compute_dtype` defaults to the parameter dtype (float32 params compute in float32, so
    fp32 parity with transformers holds; bf16 params compute in bf16). `sharding`: see `restore_params`. Other
    keyword arguments override runtime config fields (e.g. ``attention_impl="xla"``, ``remat_policy="none"``).

    Weight-only quantization for inference: `quantize` = ``"int8"`` (one scale per output channel, unless
    `group_size` is given) or ``"int4"`` (symmetric groups of `group_size` input features, default 128, two values
    per byte). The matrices are quantized tensor by tensor while they are read (the full-precision model never
    exists in memory) and the matmuls dequantize on the fly (`phi4_jax.quant.weights`). `quantize_embed`: the
    embedding table as ``"int8"`` rows (default), ``"same"`` as the other matrices, or None (kept in `dtype`);
    `quantize_lm_head=False` keeps the lm_head in `dtype`. Norms stay in `dtype`. Tensors that a checkpoint or
    GGUF file already holds quantized (Q8_0 -> int8, Q4_0/Q4_K -> int4, in groups of 32) are used as they are,
    whatever `quantize` says. A quantized model loads onto one device (`sharding` must be None) and is for
    inference (generate, chat, serve); `progress=True` shows a bar while it loads.

    A ``.gguf`` file's embedded tokenizer must be phi-4's (the converter's check); `check_tokenizer=False` loads a
    file whose tokenizer differs anyway (``convert_weights.py --no-tokenizer-check``). Checkpoint directories
    hold no tokenizer, so it does not apply to them.
    """
    from phi4_jax.model.decoder import model_from_params

    dtype_name = _resolve_dtype(dtype)
    options = _quantize_options(quantize, group_size, quantize_embed, quantize_lm_head)
    if str(path).endswith(".gguf"):
        return _load_gguf_model(path, dtype_name, options, sharding, compute_dtype, progress, check_tokenizer,
                                config_overrides)
    stored_config, meta = read_checkpoint_config(path)
    param_dtype = dtype_name or meta.get("param_dtype", stored_config.param_dtype)
    config = _runtime_config(stored_config, param_dtype, compute_dtype, config_overrides)
    if options is not None or meta.get("quantized"):
        from phi4_jax.checkpoint.quantized_load import checkpoint_sources

        _check_unsharded(sharding)
        sources = checkpoint_sources(params_directory(path, meta), config, meta)
        return _quantized_model(config, sources, options, param_dtype, progress, f"loading {Path(path).name}")
    params = _restore(params_directory(path, meta), config, param_dtype, sharding)
    return model_from_params(config, params)


def _runtime_config(stored_config: Phi4Config, param_dtype: str, compute_dtype, overrides: dict) -> Phi4Config:
    compute = _resolve_dtype(compute_dtype) or param_dtype
    runtime = {"param_dtype": param_dtype, "compute_dtype": compute}
    runtime.update(overrides)
    try:
        return stored_config.replace(**runtime)
    except ConfigError as e:
        raise CheckpointError(f"bad config override: {e}") from None


def _quantize_options(quantize, group_size, quantize_embed, quantize_lm_head):
    from phi4_jax.quant.weights import QuantizationError, QuantizeOptions

    if quantize is None:
        if group_size is not None:
            raise CheckpointError("group_size needs quantize='int8' or 'int4'")
        return None
    try:
        return QuantizeOptions(quantize, group_size, quantize_embed, quantize_lm_head)
    except QuantizationError as e:
        raise CheckpointError(str(e)) from None


def _check_unsharded(sharding) -> None:
    if sharding is not None:
        raise CheckpointError("quantized weights load onto one device: sharding is not supported with them")


def _quantized_model(config: Phi4Config, sources, options, param_dtype: str, progress: bool, desc: str):
    from phi4_jax.checkpoint.quantized_load import load_params
    from phi4_jax.quant.weights import QuantizationError, quantized_model

    params = load_params(sources, options, param_dtype, progress=progress, desc=desc)
    try:
        return quantized_model(config, params)
    except QuantizationError as e:
        raise CheckpointError(str(e)) from None


def _load_gguf_model(path, dtype_name, options, sharding, compute_dtype, progress, check_tokenizer, overrides):
    """`load_model` of a ``.gguf`` file: its quantized blocks kept (re-blocked), other tensors in `dtype`."""
    from phi4_jax.checkpoint.gguf_quantized import gguf_sources
    from phi4_jax.checkpoint.hf_files import ConversionError

    _check_unsharded(sharding)
    param_dtype = dtype_name or "float32"
    try:
        stored_config, sources, _ = gguf_sources(path, check_tokenizer=check_tokenizer)
        config = _runtime_config(stored_config, param_dtype, compute_dtype, overrides)
        return _quantized_model(config, sources, options, param_dtype, progress, f"loading {Path(path).name}")
    except ConversionError as e:
        raise CheckpointError(str(e)) from None
