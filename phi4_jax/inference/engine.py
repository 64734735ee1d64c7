"""`generate`: bucketed prefill, then decoding on the device (or a host loop when streaming).

Flow of `generate`:

1. prompts are right-padded to a bucketed length P (a power of two) and the batch to a power of two;
2. `prefill` runs the prompts into an empty cache and samples each sequence's first token from the logits at
   its last prompt token;
3. `decode_step` feeds one token per sequence, writes its key/value at slot lengths[b], attends with
   `kernels.decode_attention` (in shard_map on a mesh, see `kv_cache`), and samples the next token. Without a streaming callback the whole decode loop
   is one jitted `lax.while_loop` on the device (cache donated) that stops when every sequence has hit a stop
   token or its budget; with a callback, a host loop dispatches one jitted, cache-donating step per token and
   hands the new tokens to the callback, dispatching the next step before it fetches the current tokens.

Shapes are bucketed (batch, prompt length, cache capacity, output length, number of stop tokens), so a new
prompt length or token count does not recompile. A prompt of max_position_embeddings tokens or more raises
`ContextLengthError`; a sequence whose prompt plus max_new_tokens would overflow the context stops when the
context is full.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.checks import check_integer, first_out_of_range, is_integer, is_number
from phi4_jax.inference.errors import ContextLengthError, GenerationError
from phi4_jax.inference.kv_cache import (
    CACHE_AXES,
    SCALE_AXES,
    KVCache,
    decode_implementation,
    decode_step,
    extend,
    prefill,
    stack_cache,
    unstack_layers,
)
from phi4_jax.inference.kv_quant import cache_dtype_name as kv_cache_dtype_name
from phi4_jax.inference.sampling import Sampler, keys_from_seeds_jit, sample, seed_array
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.special_tokens import ENDOFTEXT_ID

NO_TOKEN = -1  # placeholder in output buffers after a sequence has finished
MIN_PROMPT_BUCKET = 32
MIN_NEW_BUCKET = 16
MIN_STOP_BUCKET = 4


def bucket(n: int, minimum: int, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), but at most cap (when cap >= n)."""
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    if cap is not None and n <= cap:
        size = min(size, cap)
    return size


def hashable_rules(rules) -> tuple | None:
    if rules is None:
        return None
    items = dict(rules).items()
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items))


class MeshRules(NamedTuple):
    """Static (hashable) mesh + rules for jitted functions; None means a single device."""
    mesh: Any
    rules: tuple

    def context(self):
        return sharding.activation_sharding(self.mesh, dict(self.rules))


def mesh_rules_context(shard: MeshRules | None):
    if shard is None:
        return contextlib.nullcontext()
    return shard.context()


def _is_stop(tokens, stop_tokens):
    return jnp.any(tokens[:, None] == stop_tokens[None, :], axis=-1)


def _sample_first(logits, keys, budget, stop_tokens, temperature, top_p, sampler):
    """(first new token, done) per sequence from the logits after a prefill or an extension."""
    first = sample(logits, keys, 0, sampler, temperature, top_p)
    first = jnp.where(budget > 0, first, NO_TOKEN)
    return first, (budget <= 1) | _is_stop(first, stop_tokens)


@functools.partial(jax.jit, static_argnames=("config", "capacity", "cache_dtype", "sampler", "shard"))
def prefill_and_sample(params, tokens, lengths, keys, budget, stop_tokens, temperature, top_p, *,
                        config, capacity, cache_dtype, sampler, shard):
    """`prefill` right-padded prompts into a fresh cache and sample each sequence's first new token."""
    with mesh_rules_context(shard):
        cache, logits = prefill(params, tokens, lengths, config, capacity, cache_dtype)
        first, done = _sample_first(logits, keys, budget, stop_tokens, temperature, top_p, sampler)
        return cache, first, done


@functools.partial(jax.jit, static_argnames=("config", "sampler", "shard"), donate_argnames=("cache",))
def extend_and_sample(params, cache, tokens, n_new, keys, budget, stop_tokens, temperature, top_p, *,
                       config, sampler, shard):
    """`extend` the cache by right-padded tokens [B, T] and sample each sequence's first new token."""
    with mesh_rules_context(shard):
        cache, logits = extend(params, cache, tokens, n_new, config)
        first, done = _sample_first(logits, keys, budget, stop_tokens, temperature, top_p, sampler)
        return cache, first, done


@functools.partial(jax.jit, static_argnames=("capacity", "shard"))
def grow_cache(cache, *, capacity, shard):
    """The cache copied into a larger one of `capacity` slots (same contents and lengths)."""
    with mesh_rules_context(shard):
        shape = cache.k.shape[:2] + (capacity,) + cache.k.shape[3:]
        k = jax.lax.dynamic_update_slice(jnp.zeros(shape, cache.k.dtype), cache.k, (0, 0, 0, 0, 0))
        v = jax.lax.dynamic_update_slice(jnp.zeros(shape, cache.v.dtype), cache.v, (0, 0, 0, 0, 0))
        grown = KVCache(sharding.constrain(k, CACHE_AXES), sharding.constrain(v, CACHE_AXES), cache.lengths)
        if cache.k_scale is not None:   # an int8 cache's scales grow with it
            grow = lambda s: sharding.constrain(jax.lax.dynamic_update_slice(  # noqa: E731
                jnp.zeros(shape[:-1], s.dtype), s, (0, 0, 0, 0)), SCALE_AXES)
            grown = grown._replace(k_scale=grow(cache.k_scale), v_scale=grow(cache.v_scale))
        return grown


@jax.jit
def advance_keys(keys):
    return jax.vmap(lambda k: jax.random.split(k)[1])(keys)


def _decode_body(params, cache, token, done, count, budget, keys, stop_tokens, temperature, top_p,
                 config, sampler):
    """One decode step for all sequences; `count` = tokens generated so far (the step index)."""
    cache, logits = decode_step(params, cache, jnp.maximum(token, 0), config, active=~done)
    new = sample(logits, keys, count, sampler, temperature, top_p)
    new = jnp.where(done, NO_TOKEN, new)
    done = done | _is_stop(new, stop_tokens) | (count + 1 >= budget)
    return cache, new, done


@functools.partial(jax.jit, static_argnames=("config", "sampler", "shard", "out_len"),
                   donate_argnames=("cache",))
def _decode_loop(params, cache, first, done, budget, keys, stop_tokens, temperature, top_p, *,
                 config, sampler, shard, out_len):
    """Decodes on the device until every sequence is done; returns ([B, out_len] tokens, final cache)."""
    with mesh_rules_context(shard):
        b = first.shape[0]
        out = jnp.full((b, out_len), NO_TOKEN, jnp.int32).at[:, 0].set(first)

        def cond(state):
            _, _, done, count, _ = state
            return (count < out_len) & ~jnp.all(done)

        def body(state):
            cache, token, done, count, out = state
            cache, new, done = _decode_body(params, cache, token, done, count, budget, keys, stop_tokens,
                                            temperature, top_p, config, sampler)
            out = jax.lax.dynamic_update_slice(out, new[:, None], (0, count))
            return cache, new, done, count + 1, out

        state = (cache, first, done, jnp.int32(1), out)
        cache, _, _, _, out = jax.lax.while_loop(cond, body, state)
        return out, cache


@functools.partial(jax.jit, static_argnames=("config", "sampler", "shard"), donate_argnames=("cache",))
def _decode_one(params, cache, token, done, count, budget, keys, stop_tokens, temperature, top_p, *,
                config, sampler, shard):
    with mesh_rules_context(shard):
        return _decode_body(params, cache, token, done, count, budget, keys, stop_tokens, temperature,
                            top_p, config, sampler)


# A second copy of the layer weights (the per-layer layout) may take at most this share of the host's memory.
PER_LAYER_MAX_MEMORY_FRACTION = 0.25


def per_layer_decode(params, config: Phi4Config, shard) -> bool:
    """Whether to decode in the per-layer layout (`kv_cache.unstack_layers`): on the CPU backend, unsharded, when
    a copy of the layer weights takes at most `PER_LAYER_MAX_MEMORY_FRACTION` of physical memory.

    Why: the layer scan slices each layer's weights out of the stacked [layers, ...] arrays, and XLA:CPU copies
    those slices before its matmuls, so a scanned decode step reads and writes every weight twice more than it
    multiplies by it; a decode step is memory-bound, so that copy was most of its time (profile in
    BENCHMARKS.md's Decode section). Unrolled over per-layer arrays, the step reads each weight once; each
    layer's cache is kept heads first ([B, Hkv, C, D]), which the attention dots read without a copy, and q/k/v
    and gate/up are concatenated (`decoder.fuse_projections`: fewer, larger matmuls; at batch 8 a step is
    short of per-op overhead as much as of bandwidth). The copy
    into that layout is made once per decode call. Only with XLA's decode attention (not the Pallas kernel).
    GPUs and TPUs fuse the slice into the matmul, and a sharded or large model keeps the stacked layout (no
    second copy of the weights).
    """
    if shard is not None or config.kernel_interpret or decode_implementation(config) == "pallas":
        return False
    layers = jax.tree.leaves(params["layers"])
    if not layers or not all(isinstance(w, jax.Array) for w in layers):
        return False
    if any(d.platform != "cpu" for w in layers for d in w.devices()):
        return False
    layer_bytes = sum(w.size * w.dtype.itemsize for w in layers)
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return layer_bytes <= PER_LAYER_MAX_MEMORY_FRACTION * physical


_unstack_layers = jax.jit(unstack_layers)
_stack_cache = jax.jit(stack_cache)


# ----------------------------------------------------------------------------- the public API

def default_stop_tokens(config: Phi4Config) -> list[int]:
    """phi-4's <|im_end|> (config.eos_token_id) and <|endoftext|> (100257), where the vocab has them."""
    stops = [config.eos_token_id, ENDOFTEXT_ID]
    return sorted({t for t in stops if 0 <= t < config.vocab_size})


def validate_prompts(prompts, config: Phi4Config) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise GenerationError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        if not all(is_integer(t) for t in prompt):
            raise GenerationError(f"prompt {i} must hold integer token ids")
        ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError(f"prompt {i} is empty; it needs at least one token")
        bad = first_out_of_range(ids, config.vocab_size)
        if bad is not None:
            raise GenerationError(f"prompt {i} has token id {bad} outside the vocabulary [0, {config.vocab_size})")
        if len(ids) >= config.max_position_embeddings:
            raise ContextLengthError(
                f"prompt {i} has {len(ids)} tokens but the context window is {config.max_position_embeddings} "
                "(max_position_embeddings), leaving no room for a new token; shorten the prompt")
        out.append(ids)
    return out


def validate_sampling(max_new_tokens, temperature, top_k, top_p):
    check_integer(max_new_tokens, "max_new_tokens", GenerationError)
    if not is_number(temperature) or not temperature >= 0:
        raise GenerationError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None:
        check_integer(top_k, "top_k (or None)", GenerationError)
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def model_params_config(model):
    try:
        return model.params, model.config
    except AttributeError:
        raise GenerationError(
            f"model must be a phi4_jax model (with .params and .config), got {type(model).__name__}") from None


class RunOptions(NamedTuple):
    """Validated settings shared by `generate` and `ChatSession`."""
    stops: np.ndarray          # stop ids padded with NO_TOKEN to a bucketed length
    shard: MeshRules | None
    cache_dtype: str | None
    sampler: Sampler
    temp: np.float32
    top_p: np.float32


def run_options(config, temperature, top_k, top_p, stop_tokens, mesh, rules, cache_dtype) -> RunOptions:
    if stop_tokens is None:
        stop_tokens = default_stop_tokens(config)
    stop_tokens = [int(t) for t in stop_tokens]
    if (mesh is None) != (rules is None):
        raise GenerationError("pass both mesh and rules (or neither) to shard generation")
    shard = None if mesh is None else MeshRules(mesh, hashable_rules(rules))
    cache_dtype_name = kv_cache_dtype_name(cache_dtype)
    stops = np.full((bucket(len(stop_tokens), MIN_STOP_BUCKET),), NO_TOKEN, np.int32)
    stops[:len(stop_tokens)] = stop_tokens
    greedy = float(temperature) == 0.0
    sampler = Sampler(greedy=greedy, top_k=None if greedy else (None if top_k is None else int(top_k)),
                      use_top_p=not greedy and top_p is not None and float(top_p) < 1.0)
    return RunOptions(stops, shard, cache_dtype_name, sampler,
                       np.float32(1.0 if greedy else temperature), np.float32(1.0 if top_p is None else top_p))


def generate(model, prompts, *, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0,
             stop_tokens=None, callback: Callable[[list[int | None]], None] | None = None,
             mesh=None, rules=None, cache_dtype=None) -> list[list[int]]:
    """Generates continuations of token-id prompts; returns the new tokens of each prompt.

    Args:
      model: a phi4_jax model (`phi4_jax.load_model`, `model_from_params`, `Phi4ForCausalLM`).
      prompts: list of token-id lists, any lengths (each shorter than the context window).
      max_new_tokens: at most this many new tokens per prompt (fewer if the context window fills up).
      temperature: 0 = greedy; else sample from softmax(logits / temperature).
      top_k, top_p: restrict sampling to the k most likely tokens / the smallest set of mass top_p.
      seed: int (sequence b uses key fold_in(key(seed), b)) or one int per prompt.
      stop_tokens: ids that end a sequence (included in its output); default `default_stop_tokens`.
      callback: called after each step with one entry per prompt: its new token, or None once finished.
        Streaming runs a host loop (one dispatch per token); without it the loop runs on the device.
      mesh, rules: a jax Mesh and logical-axis rules table to shard the cache and activations by.
      cache_dtype: KV cache dtype (default: the model's compute dtype): "bfloat16", "float16", "float32" or
        "int8" (int8 keys/values with a float32 scale per token and kv head, see `kv_quant`).

    Raises GenerationError for bad arguments, ContextLengthError for a prompt that cannot fit.
    """
    params, config = model_params_config(model)
    prompts = validate_prompts(prompts, config)
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    opts = run_options(config, temperature, top_k, top_p, stop_tokens, mesh, rules, cache_dtype)
    shard, sampler, stops, temp, top_p_value = opts.shard, opts.sampler, opts.stops, opts.temp, opts.top_p

    n = len(prompts)
    limit = config.max_position_embeddings
    prompt_lens = [len(p) for p in prompts]
    budgets = [min(int(max_new_tokens), limit - length) for length in prompt_lens]
    batch = bucket(n, 1)
    longest = max(prompt_lens)
    capacity = bucket(min(longest + int(max_new_tokens), limit), MIN_PROMPT_BUCKET, cap=limit)
    prompt_len = min(bucket(longest, MIN_PROMPT_BUCKET), capacity)
    out_len = bucket(max(budgets), MIN_NEW_BUCKET)

    tokens = np.zeros((batch, prompt_len), np.int32)
    lengths = np.ones((batch,), np.int32)          # padding rows: one token, budget 0 (done at once)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
    budget = np.zeros((batch,), np.int32)
    budget[:n] = budgets
    seeds, per_prompt_seeds = seed_array(seed, n, batch)
    keys = keys_from_seeds_jit(seeds, per_prompt_seeds)

    cache, first, done = prefill_and_sample(
        params, tokens, lengths, keys, budget, stops, temp, top_p_value,
        config=config, capacity=capacity, cache_dtype=opts.cache_dtype, sampler=sampler, shard=shard)

    out, _ = run_decode(params, cache, first, done, budget, keys, stops, temp, top_p_value, n=n,
                         out_len=out_len, callback=callback, config=config, sampler=sampler, shard=shard,
                         keep_cache=False)
    return [trim_output(out[i], budgets[i]) for i in range(n)]


def run_decode(params, cache, first, done, budget, keys, stops, temp, top_p_value, *, n, out_len, callback,
                config, sampler, shard, keep_cache=True):
    """Decodes after a prefill/extension; returns (tokens [B, <= out_len] numpy, final cache).

    Without a callback the loop runs on the device (`_decode_loop`), with one it is a host loop of
    `_decode_one` steps that passes each step's tokens (first n sequences, None once finished) to it; step k+1
    is dispatched before step k's tokens are fetched (one extra step at the end advances no cache length).
    When the first token is all the budget allows, no decode program runs and the cache is returned as is.
    On the CPU backend the loop runs in the per-layer layout (`per_layer_decode`); the returned cache is stacked
    again unless `keep_cache` is False (then it is whatever the loop left, for a caller that drops it).
    """
    if int(np.max(np.asarray(budget))) <= 1:  # the prefill's token is all there is: no decode program needed
        out = np.asarray(first)[:, None]
        if callback is not None:
            callback([int(t) if t != NO_TOKEN else None for t in out[:n, 0]])
        return out, cache
    per_layer = per_layer_decode(params, config, shard) and cache.k_scale is None   # int8: stacked layout
    if per_layer:
        params, cache = _unstack_layers(params, cache)
    if callback is None:
        out, cache = _decode_loop(params, cache, first, done, budget, keys, stops, temp, top_p_value,
                                  config=config, sampler=sampler, shard=shard, out_len=out_len)
        return np.asarray(out), (_stack_cache(cache) if per_layer and keep_cache else cache)
    # Pipelined: step k+1 is dispatched before step k's tokens are fetched, so the device computes while the
    # host copies and runs the callback. Once every sequence is done, the step already in flight advances no
    # cache length (no sequence is active; it writes only past each length) and its tokens are dropped.
    columns = []
    token, count = first, 1
    while True:
        in_flight = None
        if count < out_len:
            cache, *in_flight = _decode_one(params, cache, token, done, np.int32(count), budget, keys, stops, temp,
                                            top_p_value, config=config, sampler=sampler, shard=shard)
        column, done_host = jax.device_get((token, done))   # one transfer for both
        finished = bool(np.all(done_host))
        columns.append(column)
        callback([int(t) if t != NO_TOKEN else None for t in column[:n]])
        if finished or in_flight is None:
            break
        (token, done), count = in_flight, count + 1
    return np.stack(columns, axis=1), (_stack_cache(cache) if per_layer and keep_cache else cache)


def trim_output(row: np.ndarray, budget: int) -> list[int]:
    result = []
    for t in row[:budget]:
        if t == NO_TOKEN:
            break
        result.append(int(t))
    return result
