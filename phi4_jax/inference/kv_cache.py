"""A contiguous KV cache and the forward passes that fill and read it: `prefill`, `extend`, `decode_step`.

Generation itself runs on the paged cache of the serving engine (`paged_cache`, `batching`); these functions are
the plain per-sequence-cache forms the decode-bandwidth and inference-memory benchmarks compile and time.

Layout (`KVCache`): k, v ``[layers, batch, capacity, kv_heads, head_dim]`` (logical axes `CACHE_AXES`),
lengths ``[batch]`` int32. Sequence b occupies slots 0 .. lengths[b]-1 and the token in slot s sits at position s
(prompts are right-padded, so RoPE positions need no offsets). The cache is GQA-sized and stored in the compute
dtype unless asked otherwise; under a mesh it is laid out by the rules table like every activation. The layer
math is the model's own: each layer is `decoder_block` with an attention over the cache plugged in.

An int8 cache (`cache_dtype="int8"`, see `kv_quant`) holds int8 k/v and float32 scales k_scale, v_scale
``[layers, batch, capacity, kv_heads]``: the prefill attends over its own float keys/values and stores them
quantized; `extend` quantizes what it writes and attends with `kernels.decode_attention_reference` given the
scales (XLA, the scales applied after the dots), in the stacked layout only (not the CPU per-layer layout, not
the Pallas decode kernel).

Attention follows `config.attention_impl`: the prefill attends over the prompt with `decoder.rotated_attention`
(RoPE applied first, since the cache keeps rotated keys), and `extend` / `decode_step` with `cache_attention`
(`kernels.decode_attention`, the Pallas decode kernel for "pallas_tpu"; see `decode_implementation`). Under an active
`sharding.activation_sharding` both go through the kernels' shard_map wrappers where a Pallas kernel needs them
(`kernels.sharded_flash_attention`, `kernels.sharded_decode_attention`), with the mesh axes derived from the same
rules table.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

import kernels
from phi4_jax.inference.kv_quant import SCALE_DTYPE, is_int8, quantize_kv
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.model.decoder import (
    decoder_block,
    embed_tokens,
    logits_from_hidden,
    rms_norm,
    rope,
    rotated_attention,
)

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
SCALE_AXES = CACHE_AXES[:-1]


class KVCache(NamedTuple):
    """Keys and values of every layer (and their scales when int8, else None); see the module docstring."""
    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


def cache_sharding(mesh, rules):
    """The NamedSharding of the cache's k/v under a mesh and rules table."""
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(CACHE_AXES, dict(rules)))


def cache_bytes(config: Phi4Config, batch: int, capacity: int, dtype=None) -> int:
    """Bytes of a KV cache: 2 (k and v) x layers x batch x capacity x kv_heads x head_dim x itemsize (plus an int8
    cache's float32 scale per token and kv head)."""
    dtype = jnp.dtype(dtype or config.compute_dtype)
    per_head = config.head_dim * dtype.itemsize + (jnp.dtype(SCALE_DTYPE).itemsize if is_int8(dtype) else 0)
    return 2 * config.num_layers * batch * capacity * config.num_kv_heads * per_head


def init_cache(config: Phi4Config, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache, int8 with scales for dtype "int8" (call inside jit / an activation_sharding context to get
    it sharded)."""
    shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.compute_dtype)
    k = sharding.constrain(jnp.zeros(shape, dtype), CACHE_AXES)
    v = sharding.constrain(jnp.zeros(shape, dtype), CACHE_AXES)
    cache = KVCache(k, v, jnp.zeros((batch,), jnp.int32))
    if is_int8(dtype):
        scales = lambda: sharding.constrain(jnp.zeros(shape[:-1], SCALE_DTYPE), SCALE_AXES)  # noqa: E731
        cache = cache._replace(k_scale=scales(), v_scale=scales())
    return cache


# ----------------------------------------------------------------------------- forward with a cache

def decode_implementation(config: Phi4Config) -> str | None:
    """`kernels.decode_attention`'s implementation for a model config: the Pallas decode kernel ("pallas") for
    attention_impl "pallas_tpu", its own default for None (the kernel on a TPU, or interpreted when
    `kernel_interpret`), else the XLA reference ("xla": there is no GPU decode kernel)."""
    if config.attention_impl == "pallas_tpu":
        return "pallas"
    return None if config.attention_impl is None else "xla"


def cache_attention(q, k_cache, v_cache, lengths, config: Phi4Config):
    """New queries q [B, T, Hq, D] against one layer's cache [B, C, Hkv, D] (see `kernels.decode_attention`): on
    an active mesh through `kernels.sharded_decode_attention` (batch and kv heads split as the rules say) where
    `sharding.sharded_decode_args` says so, else a plain call."""
    implementation = decode_implementation(config)
    kwargs = {"implementation": implementation, "interpret": config.kernel_interpret}
    shard = sharding.sharded_decode_args(implementation)
    if shard is not None:
        return kernels.sharded_decode_attention(q, k_cache, v_cache, lengths, **kwargs, **shard)
    return kernels.decode_attention(q, k_cache, v_cache, lengths, **kwargs)


def prefill(params, tokens, lengths, config: Phi4Config, capacity: int, cache_dtype=None):
    """Runs right-padded prompts tokens [B, P] (true lengths [B]) into a fresh cache of `capacity` slots.

    Returns (cache with lengths = `lengths`, float32 logits [B, vocab] at each prompt's last token).
    """
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
    cache = init_cache(config, b, capacity, cache_dtype)
    x = embed_tokens(params, tokens, config)

    quantized = cache.k_scale is not None
    kv_dtype = config.compute_dtype if quantized else cache.k.dtype

    def attend(q, k, v):
        q = rope(q, positions, config)
        k = rope(k, positions, config)
        k, v = k.astype(kv_dtype), v.astype(kv_dtype)
        # Into an empty cache: plain causal attention over the prompt (in shard_map on a mesh). Padding sits
        # after every real token, so causality alone keeps it out of real tokens' attention.
        return rotated_attention(q.astype(k.dtype), k, v, None, config), (k, v)

    def body(x, layer):
        return decoder_block(layer, x, config, attend)

    x, (ks, vs) = jax.lax.scan(body, x, params["layers"])      # ks [L, B, P, Hkv, D]
    put = lambda into, new, axes: sharding.constrain(  # noqa: E731
        jax.lax.dynamic_update_slice(into, new, (0,) * into.ndim), axes)
    if quantized:
        (ks, k_scale), (vs, v_scale) = quantize_kv(ks), quantize_kv(vs)
        cache = cache._replace(k_scale=put(cache.k_scale, k_scale, SCALE_AXES),
                               v_scale=put(cache.v_scale, v_scale, SCALE_AXES))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]   # [B, E]
    h = rms_norm(last, params["final_norm"], config.rms_norm_eps)
    cache = cache._replace(k=put(cache.k, ks, CACHE_AXES), v=put(cache.v, vs, CACHE_AXES),
                           lengths=lengths.astype(jnp.int32))
    return cache, logits_from_hidden(params, h, config)


def extend(params, cache: KVCache, tokens, n_new, config: Phi4Config):
    """Feeds new tokens [B, T] after each sequence's cached ones; returns (cache, logits [B, vocab]).

    Sequence b has n_new[b] real new tokens, right-padded to T. Token t sits at slot and position
    cache.lengths[b] + t. The keys/values of all T tokens are written (padding lands past the new length,
    where it is never attended and later overwritten; writes past the capacity are dropped) and the new
    queries attend with `kernels.decode_attention` (causal among themselves). The returned cache has
    lengths + n_new; the float32 logits are those at each sequence's last real new token (meaningless
    for a sequence with n_new[b] = 0, which does not advance).
    """
    b, t = tokens.shape
    start = cache.lengths
    slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]    # [B, T] slot = position
    attend_lengths = start + t                                         # query t sits at start + t
    x = embed_tokens(params, tokens, config)                                # [B, T, E]
    batch_index = jnp.arange(b)[:, None]

    def attend_and_write(q, k, v, k_cache, v_cache, i):
        """RoPE, the new keys/values written into layer i of the stacked cache [L, B, C, Hkv, D] (in place, where
        slicing the layer out first would copy), attention over that layer's cache."""
        q = rope(q, slots, config)
        k = rope(k, slots, config)
        where = (i, batch_index, slots)
        k_cache = k_cache.at[where].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[where].set(v.astype(v_cache.dtype), mode="drop")
        out = cache_attention(q.astype(k_cache.dtype), k_cache[i], v_cache[i], attend_lengths, config)
        return out, (k_cache, v_cache)

    k_scale_all = v_scale_all = None
    if cache.k_scale is not None:
        # int8: each layer's new keys/values quantized as they are written; attention applies the scales.
        def body_int8(carry, xs):
            x, c = carry
            layer, i = xs

            def attend(q, k, v):
                q, k = rope(q, slots, config), rope(k, slots, config)
                (k_codes, k_scale), (v_codes, v_scale) = quantize_kv(k), quantize_kv(v)
                where = (i, batch_index, slots)
                c_new = c._replace(k=c.k.at[where].set(k_codes, mode="drop"),
                                   v=c.v.at[where].set(v_codes, mode="drop"),
                                   k_scale=c.k_scale.at[where].set(k_scale, mode="drop"),
                                   v_scale=c.v_scale.at[where].set(v_scale, mode="drop"))
                out = kernels.decode_attention_reference(q, c_new.k[i], c_new.v[i], attend_lengths,
                                                         k_scale=c_new.k_scale[i], v_scale=c_new.v_scale[i])
                return out, c_new

            x, c = decoder_block(layer, x, config, attend)
            return (x, c), None

        layer_index = jnp.arange(config.num_layers)
        (x, c), _ = jax.lax.scan(body_int8, (x, cache), (params["layers"], layer_index))
        k_all, v_all = sharding.constrain(c.k, CACHE_AXES), sharding.constrain(c.v, CACHE_AXES)
        k_scale_all = sharding.constrain(c.k_scale, SCALE_AXES)
        v_scale_all = sharding.constrain(c.v_scale, SCALE_AXES)
    else:
        def body(carry, xs):
            x, k_all, v_all = carry
            layer, i = xs
            attend = functools.partial(attend_and_write, k_cache=k_all, v_cache=v_all, i=i)
            x, (k_all, v_all) = decoder_block(layer, x, config, attend)
            return (x, k_all, v_all), None

        layer_index = jnp.arange(config.num_layers)
        (x, k_all, v_all), _ = jax.lax.scan(body, (x, cache.k, cache.v), (params["layers"], layer_index))
        k_all = sharding.constrain(k_all, CACHE_AXES)
        v_all = sharding.constrain(v_all, CACHE_AXES)
    n_new = n_new.astype(jnp.int32)
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]   # [B, E]
    h = rms_norm(last, params["final_norm"], config.rms_norm_eps)
    return KVCache(k_all, v_all, start + n_new, k_scale_all, v_scale_all), logits_from_hidden(params, h, config)


def decode_step(params, cache: KVCache, tokens, config: Phi4Config, active=None):
    """Feeds tokens [B] (one per sequence) at positions cache.lengths; returns (cache, logits [B, vocab]).

    `extend` with one new token. Sequences with active[b] False (finished) do not advance: their slot is
    overwritten, never attended.
    """
    b = tokens.shape[0]
    n_new = jnp.ones((b,), jnp.int32) if active is None else active.astype(jnp.int32)
    return extend(params, cache, tokens[:, None], n_new, config)
