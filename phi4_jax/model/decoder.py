"""The Phi-4 decoder (Phi3ForCausalLM architecture) in Flax NNX.

Parameters live in `Phi4ForCausalLM` as `nnx.Param`s, each tagged with `logical_axes` (the names the
sharding rules map to mesh axes). The decoder layers are stored stacked, with a leading ``layers`` axis,
and run under `jax.lax.scan`, so compile time does not grow with depth.

The math is written as pure functions over a plain parameter dict (`forward`, `decoder_layer`, ...) that
the module's `__call__` wraps; training, generation and the converter use the same functions. Every weight
product goes through `model.linear` (`linear`, `embedding_lookup`), where quantized or adapted weights plug in.

Parameter tree (shapes; PyTorch's [out, in] Linear weights are stored here as [in, out]):

    embed        [vocab, embed]
    layers/attn_norm   [L, embed]               layers/mlp_norm   [L, embed]
    layers/q_proj      [L, embed, q_heads, head_dim]
    layers/k_proj      [L, embed, kv_heads, head_dim]
    layers/v_proj      [L, embed, kv_heads, head_dim]
    layers/o_proj      [L, q_heads, head_dim, embed]
    layers/gate_proj   [L, embed, mlp]   layers/up_proj [L, embed, mlp]   layers/down_proj [L, mlp, embed]
    final_norm   [embed]
    lm_head      [embed, vocab]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import kernels
from phi4_jax.checks import first_out_of_range
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.model.linear import embedding_lookup, linear

Params = dict[str, Any]


# ----------------------------------------------------------------------------- parameter description

def param_specs(config: Phi4Config) -> dict[str, Any]:
    """Shape and logical axes of every parameter, before any exists: {name: (shape, axes)} (nested)."""
    c = config
    L, d, f, v = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    return {
        "embed": ((v, d), ("vocab", "embed")),
        "layers": {
            "attn_norm": ((L, d), ("layers", "norm")),
            "q_proj": ((L, d, c.num_heads, c.head_dim), ("layers", "embed", "q_heads", "head_dim")),
            "k_proj": ((L, d, c.num_kv_heads, c.head_dim), ("layers", "embed", "kv_heads", "head_dim")),
            "v_proj": ((L, d, c.num_kv_heads, c.head_dim), ("layers", "embed", "kv_heads", "head_dim")),
            "o_proj": ((L, c.num_heads, c.head_dim, d), ("layers", "q_heads", "head_dim", "embed")),
            "mlp_norm": ((L, d), ("layers", "norm")),
            "gate_proj": ((L, d, f), ("layers", "embed", "mlp")),
            "up_proj": ((L, d, f), ("layers", "embed", "mlp")),
            "down_proj": ((L, f, d), ("layers", "mlp", "embed")),
        },
        "final_norm": ((d,), ("norm",)),
        "lm_head": ((d, v), ("embed", "vocab")),
    }


def is_param_spec(x) -> bool:
    """Whether x is one (shape, logical axes) leaf of `param_specs` (for tree functions' is_leaf)."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def flat_param_specs(config: Phi4Config) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple[str, ...]]]:
    """`param_specs` flattened: {("layers", "q_proj"): (shape, axes), ...}."""
    leaves = jax.tree_util.tree_flatten_with_path(param_specs(config), is_leaf=is_param_spec)[0]
    return {tuple(k.key for k in kp): (tuple(spec[0]), spec[1]) for kp, spec in leaves}


def logical_axes_tree(config: Phi4Config) -> dict[str, Any]:
    """{name: logical axes} with the same nesting as the parameters."""
    return jax.tree.map(lambda spec: spec[1], param_specs(config), is_leaf=is_param_spec)


def init_param(key, shape, axes, dtype):
    """Phi-3 style init: N(0, 0.02) for matrices, ones for norm weights."""
    if axes[-1] == "norm":
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------- the math (pure functions)

def _dtype(name: str):
    return jnp.dtype(name)


def rms_norm(x, weight, eps):
    """RMSNorm as transformers computes it: normalize in fp32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def attention_projections(layer: Params, h, config: Phi4Config):
    """q [B, S, Hq, D], k and v [B, S, Hkv, D] from the normed hidden state h [B, S, E] (no RoPE yet)."""
    cd = _dtype(config.compute_dtype)
    with jax.named_scope("qkv_proj"):
        if "qkv_proj" in layer:  # q, k and v weights concatenated over heads (`fuse_projections`): one product
            qkv = linear("bse,ehd->bshd", h, layer["qkv_proj"], cd)
            q, k, v = jnp.split(qkv, [config.num_heads, config.num_heads + config.num_kv_heads], axis=2)
        else:
            q = linear("bse,ehd->bshd", h, layer["q_proj"], cd)
            k = linear("bse,ehd->bshd", h, layer["k_proj"], cd)
            v = linear("bse,ehd->bshd", h, layer["v_proj"], cd)
    q = sharding.constrain(q, ("batch", "seq", "q_heads", "head_dim"))
    k = sharding.constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = sharding.constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v


def attention_output(layer: Params, attn, config: Phi4Config):
    cd = _dtype(config.compute_dtype)
    with jax.named_scope("o_proj"):
        return linear("bshd,hde->bse", attn, layer["o_proj"], cd)


def mlp(layer: Params, h, config: Phi4Config):
    """SwiGLU: down(silu(gate(h)) * up(h))."""
    cd = _dtype(config.compute_dtype)
    with jax.named_scope("mlp"):
        if "gate_up_proj" in layer:  # gate and up concatenated (`fuse_projections`): one product
            gate, up = jnp.split(linear("bse,ef->bsf", h, layer["gate_up_proj"], cd), 2, axis=-1)
        else:
            gate = linear("bse,ef->bsf", h, layer["gate_proj"], cd)
            up = linear("bse,ef->bsf", h, layer["up_proj"], cd)
        act = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return linear("bsf,fe->bse", act, layer["down_proj"], cd)


def self_attention(q, k, v, positions, segment_ids, config: Phi4Config):
    """Causal attention of un-rotated q/k over the sequence itself, RoPE at `positions` included."""
    shard = sharding.sharded_attention_args(config.attention_impl)
    if shard is not None:  # on a mesh: Pallas kernels in shard_map; a split sequence -> context parallelism
        return kernels.sharded_flash_attention(q, k, v, causal=True, segment_ids=segment_ids, positions=positions,
                                               rope_theta=config.rope_theta, implementation=config.attention_impl,
                                               interpret=config.kernel_interpret, **shard)
    if config.fuse_rope:
        # RoPE inside the attention kernel's q/k tile loads where the backend's kernel supports it
        # (identical math: the XLA path rotates first, then attends).
        return kernels.flash_attention_rope(q, k, v, positions, theta=config.rope_theta, causal=True,
                                            segment_ids=segment_ids, implementation=config.attention_impl,
                                            interpret=config.kernel_interpret)
    return rotated_attention(rope(q, positions, config), rope(k, positions, config), v, segment_ids, config)


def rope(x, positions, config: Phi4Config):
    """RoPE of x [B, S, H, D] at `positions` where RoPE is not fused into attention: the Pallas RoPE kernel
    (`kernels.apply_rope(implementation="pallas")`, interpreted when `kernel_interpret`) when the model runs on the
    Pallas TPU kernels on one device, else the XLA reference: elementwise, so XLA partitions it on a mesh (where a
    bare Pallas call could not be; context parallelism rotates with the kernel inside its shard_map). On a GPU the
    Pallas RoPE kernel routes itself to XLA."""
    pallas = config.attention_impl == "pallas_tpu" and not sharding.has_active_mesh()
    implementation = "pallas" if pallas else "xla"
    return kernels.apply_rope(x, positions, theta=config.rope_theta, implementation=implementation,
                              interpret=config.kernel_interpret)


def rotated_attention(q, k, v, segment_ids, config: Phi4Config):
    """Causal attention of already-rotated q/k over the sequence itself (the prefill's, whose cache keeps the
    rotated keys): on an active mesh through `kernels.sharded_flash_attention` where `sharded_attention_args`
    says so, else `kernels.flash_attention`."""
    shard = sharding.sharded_attention_args(config.attention_impl)
    if shard is not None:
        return kernels.sharded_flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                               implementation=config.attention_impl,
                                               interpret=config.kernel_interpret, **shard)
    return kernels.flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                   implementation=config.attention_impl, interpret=config.kernel_interpret)


def fuse_projections(layer: Params) -> Params:
    """One layer's weights with q/k/v concatenated over heads (``qkv_proj`` [E, Hq + 2 Hkv, D]) and gate/up over
    the mlp axis (``gate_up_proj`` [E, 2F]), so each takes one matmul (fewer, larger ops: what a small-batch CPU
    decode step is short of). Only for plain arrays without the stacked layers axis; weight objects (quantized,
    LoRA) are left as they are."""
    fusable = lambda *names: all(isinstance(layer.get(n), jax.Array) and not hasattr(layer[n], "linear_einsum")  # noqa: E731
                                 for n in names)
    out = dict(layer)
    if fusable("q_proj", "k_proj", "v_proj"):
        out["qkv_proj"] = jnp.concatenate([out.pop("q_proj"), out.pop("k_proj"), out.pop("v_proj")], axis=1)
    if fusable("gate_proj", "up_proj"):
        out["gate_up_proj"] = jnp.concatenate([out.pop("gate_proj"), out.pop("up_proj")], axis=1)
    return out


def decoder_block(layer: Params, x, config: Phi4Config, attend):
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); x [B, S, E] in the compute dtype.

    `attend(q, k, v) -> (attn [B, S, Hq, D], aux)` gets the un-rotated projections (applying RoPE is its job,
    so a kernel can fuse it): `self_attention` for a plain forward, attention over a KV cache for generation,
    whose cache updates come back as `aux`. Returns (x, aux).
    """
    with jax.named_scope("attention"):
        h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = attention_projections(layer, h, config)
        attn, aux = attend(q, k, v)
        attn = checkpoint_name(attn.astype(x.dtype), "attention_out")
        x = x + attention_output(layer, attn, config)
    x = sharding.constrain(x, ("batch", "seq", "embed"))
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    x = x + mlp(layer, h, config)
    return sharding.constrain(x, ("batch", "seq", "embed")), aux


def decoder_layer(layer: Params, x, positions, segment_ids, config: Phi4Config):
    """`decoder_block` attending over the sequence itself (packed documents kept apart by segment_ids)."""
    attend = lambda q, k, v: (self_attention(q, k, v, positions, segment_ids, config), None)  # noqa: E731
    return decoder_block(layer, x, config, attend)[0]


def remat_policy(name: str):
    """The jax.checkpoint policy for a config's `remat_policy` (None = no remat)."""
    cp = jax.checkpoint_policies
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
        "attention_out": cp.save_only_these_names("attention_out"),
    }[name]


def default_positions(input_ids):
    b, s = input_ids.shape
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))


def embed_tokens(params: Params, input_ids, config: Phi4Config):
    """Token embeddings [B, S, E] in the compute dtype."""
    with jax.named_scope("embed"):
        x = embedding_lookup(params["embed"], input_ids, _dtype(config.compute_dtype))
    return sharding.constrain(x, ("batch", "seq", "embed"))


def hidden_states(params: Params, input_ids, config: Phi4Config, positions=None, segment_ids=None):
    """Final normed hidden states [B, S, E] (compute dtype): everything but the lm_head."""
    if positions is None:
        positions = default_positions(input_ids)
    x = embed_tokens(params, input_ids, config)

    def body(carry, layer):
        return decoder_layer(layer, carry, positions, segment_ids, config), None

    policy = remat_policy(config.remat_policy)
    if config.remat_policy != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=not config.scan_layers)
    layers = params["layers"]
    if config.scan_layers:
        x, _ = jax.lax.scan(body, x, layers)
    else:
        for i in range(config.num_layers):
            x, _ = body(x, jax.tree.map(lambda w: w[i], layers))
    return rms_norm(x, params["final_norm"], config.rms_norm_eps)


def logits_from_hidden(params: Params, h, config: Phi4Config):
    """lm_head: [..., E] -> float32 logits [..., vocab]."""
    cd = _dtype(config.compute_dtype)
    with jax.named_scope("lm_head"):
        return linear("...e,ev->...v", h, params["lm_head"], cd, preferred_element_type=jnp.float32)


def forward(params: Params, input_ids, config: Phi4Config, positions=None, segment_ids=None):
    """input_ids [B, S] int -> float32 logits [B, S, vocab]."""
    h = hidden_states(params, input_ids, config, positions, segment_ids)
    return logits_from_hidden(params, h, config)


# ----------------------------------------------------------------------------- the Flax NNX module

def _params_of(module: nnx.Module) -> Params:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


class Phi4ForCausalLM(nnx.Module):
    """Phi-4 causal LM. `model(input_ids, positions=None, segment_ids=None)` -> float32 logits."""

    def __init__(self, config: Phi4Config, *, rngs: nnx.Rngs | None = None):
        self.config = config
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = _dtype(config.param_dtype)
        specs = param_specs(config)

        def make(spec):
            shape, axes = spec
            return nnx.Param(init_param(rngs.params(), shape, axes, dtype), logical_axes=axes)

        self.embed = make(specs["embed"])
        self.layers = nnx.Dict({name: make(spec) for name, spec in specs["layers"].items()})
        self.final_norm = make(specs["final_norm"])
        self.lm_head = make(specs["lm_head"])

    @property
    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (the layout in the module docstring)."""
        return _params_of(self)

    def __call__(self, input_ids, *, positions=None, segment_ids=None):
        input_ids = jnp.asarray(input_ids)
        check_inputs(input_ids, self.config, positions, segment_ids)
        return _forward_jit(self.params, input_ids, self.config,
                            None if positions is None else jnp.asarray(positions, jnp.int32),
                            None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32))


class ModelInputError(ValueError):
    """Model inputs of the wrong shape, dtype or range."""


def check_inputs(input_ids, config: Phi4Config, positions=None, segment_ids=None) -> None:
    """Raises ModelInputError for inputs the model cannot run on.

    Token ids are range-checked when concrete (out-of-range ids would otherwise give NaN logits silently).
    """
    if input_ids.ndim != 2:
        raise ModelInputError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if 0 in input_ids.shape:
        raise ModelInputError(f"input_ids must not be empty, got shape {input_ids.shape}")
    for name, arr in (("input_ids", input_ids), ("positions", positions), ("segment_ids", segment_ids)):
        if arr is None:
            continue
        if jnp.shape(arr) != input_ids.shape:
            raise ModelInputError(
                f"{name} must have the shape of input_ids {input_ids.shape}, got {jnp.shape(arr)}")
        dtype = jnp.asarray(arr).dtype
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ModelInputError(f"{name} must be integers, got dtype {dtype}")
    if not isinstance(input_ids, jax.core.Tracer) and getattr(input_ids, "is_fully_addressable", True):
        bad = first_out_of_range(input_ids, config.vocab_size)
        if bad is not None:
            raise ModelInputError(f"token id {bad} is out of range [0, {config.vocab_size})")


_forward_jit = jax.jit(forward, static_argnums=(2,))


def abstract_model(config: Phi4Config) -> Phi4ForCausalLM:
    """The model with `jax.ShapeDtypeStruct` leaves: describes every parameter, allocates nothing."""
    return nnx.eval_shape(lambda: Phi4ForCausalLM(config, rngs=nnx.Rngs(0)))


def model_from_params(config: Phi4Config, params: Params) -> Phi4ForCausalLM:
    """Builds the module around existing parameter arrays (no random init is materialized)."""
    model = abstract_model(config)
    expected = jax.tree.map(lambda s: (tuple(s.shape)), _params_of(model))
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if expected != got:
        raise ValueError(f"parameter shapes do not match the config: expected {expected}, got {got}")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model
