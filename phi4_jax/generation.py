"""Text generation for Phi-4: a KV cache, a prefill, a jitted decode step, sampling, and `generate`.

KV cache layout (`KVCache`):

    k, v      [layers, batch, capacity, kv_heads, head_dim]   logical axes CACHE_AXES
    lengths   [batch] int32                                   valid slots per sequence

Sequence b occupies slots 0 .. lengths[b]-1 and the token in slot s sits at position s (prompts are
right-padded, so RoPE positions need no offsets). The cache is GQA-sized (kv_heads, e.g. 10 for phi-4,
not 40 query heads) and stored in the compute dtype (bf16 or fp32) unless asked otherwise. With a mesh
and a rules table, the cache is laid out by `sharding.logical_to_spec(CACHE_AXES, rules)` and every
activation follows the same rules.

Flow of `generate`:

1. prompts are right-padded to a bucketed length P (a power of two) and the batch to a power of two;
2. `prefill` runs the prompt through the layers with `kernels.flash_attention` (causal, into an empty
   cache), writes all keys/values in one update, and samples each sequence's first token from the
   logits at its last prompt token;
3. `decode_step` (`extend` with one token) feeds one token per sequence, writes its key/value at slot
   lengths[b], attends with `kernels.decode_attention`, and samples the next token. Without a streaming
   callback, the whole decode loop is one jitted `lax.while_loop` on the device (cache donated) that stops when every
   sequence has hit a stop token or its budget; with a callback, a host loop dispatches one jitted,
   cache-donating step per token and hands the new tokens to the callback.

Shapes are bucketed (batch, prompt length, cache capacity, output length, number of stop tokens), so a
new prompt length or token count does not recompile. The layer math is the model's own: each layer is
`model.decoder_block` with an attention over the cache plugged in, then `rms_norm` and `logits_from_hidden`.

Multi-turn: `ChatSession` keeps the cache between calls. A new turn keeps the longest cached prefix of
the conversation and feeds only the rest with `extend` (T new tokens per sequence at positions offset by
the cached length, causal among themselves, in bucketed chunks), then decodes as above; it rebuilds the
cache with `prefill` when little of it is reusable (e.g. after the oldest turns were dropped).

Context: a prompt of max_position_embeddings tokens or more raises `ContextLengthError`; a sequence whose
prompt plus max_new_tokens would overflow the context stops when the context is full.

Sampling: greedy (temperature 0) or softmax(logits / temperature), optionally restricted to the top_k
tokens and/or the nucleus of mass top_p. Sequence b draws its token t with key `fold_in(key_b, t)`;
key_b comes from `seed` (see `sequence_keys`), so results are reproducible, and with one seed per
prompt a prompt's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from phi4_jax import sharding
from phi4_jax.config import DTYPES, Phi4Config
from phi4_jax.model import decoder_block, embed_tokens, logits_from_hidden, rms_norm

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
ENDOFTEXT_ID = 100257  # phi-4's <|endoftext|>; <|im_end|> is config.eos_token_id (100265)
_NO_TOKEN = -1  # placeholder in output buffers after a sequence has finished
_MIN_PROMPT_BUCKET = 32
_MIN_NEW_BUCKET = 16
_MIN_STOP_BUCKET = 4


class GenerationError(ValueError):
    """Invalid arguments to generation (prompts, sampling settings, token ids)."""


class ContextLengthError(GenerationError):
    """A prompt that does not fit the model's context window."""


class KVCache(NamedTuple):
    """Keys and values of every layer; see the module docstring for the layout."""
    k: jax.Array
    v: jax.Array
    lengths: jax.Array


# ----------------------------------------------------------------------------- shapes and sharding

def bucket(n: int, minimum: int, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), but at most cap (when cap >= n)."""
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    if cap is not None and n <= cap:
        size = min(size, cap)
    return size


def _hashable_rules(rules) -> tuple | None:
    if rules is None:
        return None
    items = dict(rules).items()
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items))


class _Sharding(NamedTuple):
    """Static (hashable) mesh + rules for jitted functions; None means a single device."""
    mesh: Any
    rules: tuple

    def context(self):
        return sharding.activation_sharding(self.mesh, dict(self.rules))


def _sharding_context(shard: _Sharding | None):
    if shard is None:
        return contextlib.nullcontext()
    return shard.context()


def cache_sharding(mesh, rules):
    """The NamedSharding of the cache's k/v under a mesh and rules table."""
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(CACHE_AXES, dict(rules)))


def cache_bytes(config: Phi4Config, batch: int, capacity: int, dtype=None) -> int:
    """Bytes of a KV cache: 2 (k and v) x layers x batch x capacity x kv_heads x head_dim x itemsize."""
    itemsize = jnp.dtype(dtype or config.compute_dtype).itemsize
    return 2 * config.num_layers * batch * capacity * config.num_kv_heads * config.head_dim * itemsize


def init_cache(config: Phi4Config, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache (call inside jit / an activation_sharding context to get it sharded)."""
    shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.compute_dtype)
    k = sharding.constrain(jnp.zeros(shape, dtype), CACHE_AXES)
    v = sharding.constrain(jnp.zeros(shape, dtype), CACHE_AXES)
    return KVCache(k, v, jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------- forward with a cache

def prefill(params, tokens, lengths, config: Phi4Config, capacity: int, cache_dtype=None):
    """Runs right-padded prompts tokens [B, P] (true lengths [B]) into a fresh cache of `capacity` slots.

    Returns (cache with lengths = `lengths`, float32 logits [B, vocab] at each prompt's last token).
    """
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
    cache = init_cache(config, b, capacity, cache_dtype)
    x = embed_tokens(params, tokens, config)

    def attend(q, k, v):
        q = kernels.apply_rope(q, positions, theta=config.rope_theta)
        k = kernels.apply_rope(k, positions, theta=config.rope_theta)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        # Into an empty cache: plain causal attention over the prompt. Padding sits after every
        # real token, so causality alone keeps it out of real tokens' attention.
        attn = kernels.flash_attention(q.astype(k.dtype), k, v, causal=True, implementation=config.attention_impl,
                                       interpret=config.kernel_interpret)
        return attn, (k, v)

    def body(x, layer):
        return decoder_block(layer, x, config, attend)

    x, (ks, vs) = jax.lax.scan(body, x, params["layers"])      # ks [L, B, P, Hkv, D]
    k_cache = jax.lax.dynamic_update_slice(cache.k, ks, (0, 0, 0, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(cache.v, vs, (0, 0, 0, 0, 0))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]   # [B, E]
    h = rms_norm(last, params["final_norm"], config.rms_norm_eps)
    cache = KVCache(sharding.constrain(k_cache, CACHE_AXES), sharding.constrain(v_cache, CACHE_AXES),
                    lengths.astype(jnp.int32))
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

    def body(carry, xs):
        x, k_all, v_all = carry
        layer, i = xs

        def attend(q, k, v):
            q = kernels.apply_rope(q, slots, theta=config.rope_theta)
            k = kernels.apply_rope(k, slots, theta=config.rope_theta)
            k_new = k_all.at[i, batch_index, slots].set(k.astype(k_all.dtype), mode="drop")
            v_new = v_all.at[i, batch_index, slots].set(v.astype(v_all.dtype), mode="drop")
            attn = kernels.decode_attention(q.astype(k_new.dtype), k_new[i], v_new[i], attend_lengths)
            return attn, (k_new, v_new)

        x, (k_all, v_all) = decoder_block(layer, x, config, attend)
        return (x, k_all, v_all), None

    layer_index = jnp.arange(config.num_layers)
    (x, k_all, v_all), _ = jax.lax.scan(body, (x, cache.k, cache.v), (params["layers"], layer_index))
    n_new = n_new.astype(jnp.int32)
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]   # [B, E]
    h = rms_norm(last, params["final_norm"], config.rms_norm_eps)
    cache = KVCache(sharding.constrain(k_all, CACHE_AXES), sharding.constrain(v_all, CACHE_AXES), start + n_new)
    return cache, logits_from_hidden(params, h, config)


def decode_step(params, cache: KVCache, tokens, config: Phi4Config, active=None):
    """Feeds tokens [B] (one per sequence) at positions cache.lengths; returns (cache, logits [B, vocab]).

    `extend` with one new token. Sequences with active[b] False (finished) do not advance: their slot is
    overwritten, never attended.
    """
    b = tokens.shape[0]
    n_new = jnp.ones((b,), jnp.int32) if active is None else active.astype(jnp.int32)
    return extend(params, cache, tokens[:, None], n_new, config)


# ----------------------------------------------------------------------------- sampling

class Sampler(NamedTuple):
    """Static sampling choices (part of the compiled program); temperature and top_p values are dynamic."""
    greedy: bool
    top_k: int | None
    use_top_p: bool


def sample(logits, keys, step, sampler: Sampler, temperature, top_p):
    """Next token per sequence from float32 logits [B, V]; keys [B] (typed PRNG keys), step scalar."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    if sampler.top_k is None and not sampler.use_top_p:
        return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)
    k = logits.shape[-1] if sampler.top_k is None else min(sampler.top_k, logits.shape[-1])
    values, ids = jax.lax.top_k(logits, k)                  # descending
    if sampler.use_top_p:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(step_keys, values)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _seed_array(seed: int | Sequence[int], n: int, batch: int) -> tuple[np.ndarray, bool]:
    """(uint32 seeds [batch], whether they are per prompt) from `generate`'s `seed` argument."""
    if isinstance(seed, (int, np.integer)):
        return np.full((batch,), int(seed) % 2**32, np.uint32), False
    try:
        seeds = [int(s) for s in seed]
    except (TypeError, ValueError):
        raise GenerationError(f"seed must be an int or a list of ints (one per prompt), got {seed!r}") from None
    if len(seeds) != n:
        raise GenerationError(f"seed has {len(seeds)} entries but there are {n} prompts")
    return np.array(seeds + [0] * (batch - n), np.int64).astype(np.uint32), True


def keys_from_seeds(seeds, per_prompt: bool):
    """Per-sequence PRNG keys [B]: `key(seeds[b])` per prompt, else `fold_in(key(seeds[b]), b)` (one shared seed)."""
    keys = jax.vmap(jax.random.key)(seeds)
    if per_prompt:
        return keys
    return jax.vmap(jax.random.fold_in)(keys, jnp.arange(seeds.shape[0], dtype=jnp.uint32))


_keys_from_seeds = jax.jit(keys_from_seeds, static_argnums=1)


def sequence_keys(seed: int | Sequence[int], n: int):
    """The PRNG keys `generate` gives n prompts for `seed` (an int, or one int per prompt)."""
    seeds, per_prompt = _seed_array(seed, n, n)
    return keys_from_seeds(jnp.asarray(seeds), per_prompt)


# ----------------------------------------------------------------------------- jitted programs

def _is_stop(tokens, stop_tokens):
    return jnp.any(tokens[:, None] == stop_tokens[None, :], axis=-1)


def _sample_first(logits, keys, budget, stop_tokens, temperature, top_p, sampler):
    """(first new token, done) per sequence from the logits after a prefill or an extension."""
    first = sample(logits, keys, 0, sampler, temperature, top_p)
    first = jnp.where(budget > 0, first, _NO_TOKEN)
    return first, (budget <= 1) | _is_stop(first, stop_tokens)


@functools.partial(jax.jit, static_argnames=("config", "capacity", "cache_dtype", "sampler", "shard"))
def _prefill_and_sample(params, tokens, lengths, keys, budget, stop_tokens, temperature, top_p, *,
                        config, capacity, cache_dtype, sampler, shard):
    """`prefill` right-padded prompts into a fresh cache and sample each sequence's first new token."""
    with _sharding_context(shard):
        cache, logits = prefill(params, tokens, lengths, config, capacity, cache_dtype)
        first, done = _sample_first(logits, keys, budget, stop_tokens, temperature, top_p, sampler)
        return cache, first, done


@functools.partial(jax.jit, static_argnames=("config", "sampler", "shard"), donate_argnames=("cache",))
def _extend_and_sample(params, cache, tokens, n_new, keys, budget, stop_tokens, temperature, top_p, *,
                       config, sampler, shard):
    """`extend` the cache by right-padded tokens [B, T] and sample each sequence's first new token."""
    with _sharding_context(shard):
        cache, logits = extend(params, cache, tokens, n_new, config)
        first, done = _sample_first(logits, keys, budget, stop_tokens, temperature, top_p, sampler)
        return cache, first, done


@functools.partial(jax.jit, static_argnames=("capacity", "shard"))
def _grow_cache(cache, *, capacity, shard):
    """The cache copied into a larger one of `capacity` slots (same contents and lengths)."""
    with _sharding_context(shard):
        shape = cache.k.shape[:2] + (capacity,) + cache.k.shape[3:]
        k = jax.lax.dynamic_update_slice(jnp.zeros(shape, cache.k.dtype), cache.k, (0, 0, 0, 0, 0))
        v = jax.lax.dynamic_update_slice(jnp.zeros(shape, cache.v.dtype), cache.v, (0, 0, 0, 0, 0))
        return KVCache(sharding.constrain(k, CACHE_AXES), sharding.constrain(v, CACHE_AXES), cache.lengths)


@jax.jit
def _advance_keys(keys):
    return jax.vmap(lambda k: jax.random.split(k)[1])(keys)


def _decode_body(params, cache, token, done, count, budget, keys, stop_tokens, temperature, top_p,
                 config, sampler):
    """One decode step for all sequences; `count` = tokens generated so far (the step index)."""
    cache, logits = decode_step(params, cache, jnp.maximum(token, 0), config, active=~done)
    new = sample(logits, keys, count, sampler, temperature, top_p)
    new = jnp.where(done, _NO_TOKEN, new)
    done = done | _is_stop(new, stop_tokens) | (count + 1 >= budget)
    return cache, new, done


@functools.partial(jax.jit, static_argnames=("config", "sampler", "shard", "out_len"),
                   donate_argnames=("cache",))
def _decode_loop(params, cache, first, done, budget, keys, stop_tokens, temperature, top_p, *,
                 config, sampler, shard, out_len):
    """Decodes on the device until every sequence is done; returns ([B, out_len] tokens, final cache)."""
    with _sharding_context(shard):
        b = first.shape[0]
        out = jnp.full((b, out_len), _NO_TOKEN, jnp.int32).at[:, 0].set(first)

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
    with _sharding_context(shard):
        return _decode_body(params, cache, token, done, count, budget, keys, stop_tokens, temperature,
                            top_p, config, sampler)


# ----------------------------------------------------------------------------- the public API

def default_stop_tokens(config: Phi4Config) -> list[int]:
    """phi-4's <|im_end|> (config.eos_token_id) and <|endoftext|> (100257), where the vocab has them."""
    stops = [config.eos_token_id, ENDOFTEXT_ID]
    return sorted({t for t in stops if 0 <= t < config.vocab_size})


def _validate_prompts(prompts, config: Phi4Config) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise GenerationError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError(f"prompt {i} is empty; it needs at least one token")
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
        if len(ids) >= config.max_position_embeddings:
            raise ContextLengthError(
                f"prompt {i} has {len(ids)} tokens but the context window is {config.max_position_embeddings} "
                "(max_position_embeddings), leaving no room for a new token; shorten the prompt")
        out.append(ids)
    return out


def _validate_sampling(max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) or not temperature >= 0:
        raise GenerationError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float, np.floating)) or not 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _model_params_config(model):
    try:
        return model.params, model.config
    except AttributeError:
        raise GenerationError(
            f"model must be a phi4_jax model (with .params and .config), got {type(model).__name__}") from None


class _RunOptions(NamedTuple):
    """Validated settings shared by `generate` and `ChatSession`."""
    stops: np.ndarray          # stop ids padded with _NO_TOKEN to a bucketed length
    shard: _Sharding | None
    cache_dtype: str | None
    sampler: Sampler
    temp: np.float32
    top_p: np.float32


def _run_options(config, temperature, top_k, top_p, stop_tokens, mesh, rules, cache_dtype) -> _RunOptions:
    if stop_tokens is None:
        stop_tokens = default_stop_tokens(config)
    stop_tokens = [int(t) for t in stop_tokens]
    if (mesh is None) != (rules is None):
        raise GenerationError("pass both mesh and rules (or neither) to shard generation")
    shard = None if mesh is None else _Sharding(mesh, _hashable_rules(rules))
    cache_dtype_name = None
    if cache_dtype is not None:
        try:
            cache_dtype_name = jnp.dtype(cache_dtype).name
        except TypeError:
            cache_dtype_name = None
        if cache_dtype_name not in DTYPES:
            raise GenerationError(f"cache_dtype must be one of {', '.join(DTYPES)}, got {cache_dtype!r}")
    stops = np.full((bucket(len(stop_tokens), _MIN_STOP_BUCKET),), _NO_TOKEN, np.int32)
    stops[:len(stop_tokens)] = stop_tokens
    greedy = float(temperature) == 0.0
    sampler = Sampler(greedy=greedy, top_k=None if greedy else (None if top_k is None else int(top_k)),
                      use_top_p=not greedy and top_p is not None and float(top_p) < 1.0)
    return _RunOptions(stops, shard, cache_dtype_name, sampler,
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
      cache_dtype: KV cache dtype (default: the model's compute dtype).

    Raises GenerationError for bad arguments, ContextLengthError for a prompt that cannot fit.
    """
    params, config = _model_params_config(model)
    prompts = _validate_prompts(prompts, config)
    _validate_sampling(max_new_tokens, temperature, top_k, top_p)
    opts = _run_options(config, temperature, top_k, top_p, stop_tokens, mesh, rules, cache_dtype)
    shard, sampler, stops, temp, top_p_value = opts.shard, opts.sampler, opts.stops, opts.temp, opts.top_p

    n = len(prompts)
    limit = config.max_position_embeddings
    prompt_lens = [len(p) for p in prompts]
    budgets = [min(int(max_new_tokens), limit - length) for length in prompt_lens]
    batch = bucket(n, 1)
    longest = max(prompt_lens)
    capacity = bucket(min(longest + int(max_new_tokens), limit), _MIN_PROMPT_BUCKET, cap=limit)
    prompt_len = min(bucket(longest, _MIN_PROMPT_BUCKET), capacity)
    out_len = bucket(max(budgets), _MIN_NEW_BUCKET)

    tokens = np.zeros((batch, prompt_len), np.int32)
    lengths = np.ones((batch,), np.int32)          # padding rows: one token, budget 0 (done at once)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
    budget = np.zeros((batch,), np.int32)
    budget[:n] = budgets
    seeds, per_prompt_seeds = _seed_array(seed, n, batch)
    keys = _keys_from_seeds(seeds, per_prompt_seeds)

    cache, first, done = _prefill_and_sample(
        params, tokens, lengths, keys, budget, stops, temp, top_p_value,
        config=config, capacity=capacity, cache_dtype=opts.cache_dtype, sampler=sampler, shard=shard)

    out, _ = _run_decode(params, cache, first, done, budget, keys, stops, temp, top_p_value, n=n,
                         out_len=out_len, callback=callback, config=config, sampler=sampler, shard=shard)
    return [_trim(out[i], budgets[i]) for i in range(n)]


def _run_decode(params, cache, first, done, budget, keys, stops, temp, top_p_value, *, n, out_len, callback,
                config, sampler, shard):
    """Decodes after a prefill/extension; returns (tokens [B, <= out_len] numpy, final cache).

    Without a callback the loop runs on the device (`_decode_loop`), with one it is a host loop of
    `_decode_one` steps that passes each step's tokens (first n sequences, None once finished) to it.
    When the first token is all the budget allows, no decode program runs and the cache is returned as is.
    """
    if int(np.max(np.asarray(budget))) <= 1:  # the prefill's token is all there is: no decode program needed
        out = np.asarray(first)[:, None]
        if callback is not None:
            callback([int(t) if t != _NO_TOKEN else None for t in out[:n, 0]])
        return out, cache
    if callback is None:
        out, cache = _decode_loop(params, cache, first, done, budget, keys, stops, temp, top_p_value,
                                  config=config, sampler=sampler, shard=shard, out_len=out_len)
        return np.asarray(out), cache
    columns = []
    token = first
    count = 1
    while True:
        column, finished = np.asarray(token), bool(np.all(np.asarray(done)))
        columns.append(column)
        callback([int(t) if t != _NO_TOKEN else None for t in column[:n]])
        if finished or count >= out_len:
            break
        cache, token, done = _decode_one(params, cache, token, done, np.int32(count), budget, keys, stops,
                                         temp, top_p_value, config=config, sampler=sampler, shard=shard)
        count += 1
    return np.stack(columns, axis=1), cache


def _trim(row: np.ndarray, budget: int) -> list[int]:
    result = []
    for t in row[:budget]:
        if t == _NO_TOKEN:
            break
        result.append(int(t))
    return result


# ----------------------------------------------------------------------------- multi-turn sessions

_MAX_EXTEND_CHUNK = 512  # new tokens per `extend` call (bounds the [new, capacity] attention scores)


class ChatSession:
    """Multi-turn generation for one conversation that keeps its KV cache between turns.

    `generate(prompt, ...)` takes the whole conversation so far as token ids (e.g. the chat template
    applied to every message) and returns the new tokens, like `generate(model, [prompt], ...)`, but
    prefills only what the cache does not already hold:

    - the longest common prefix of `prompt` and the cached tokens is kept (the cache's length is rewound
      to it, so a re-tokenized earlier answer that differs from the generated ids is recomputed from the
      first differing token on), and the rest is fed with `extend` at positions offset by that prefix, in
      chunks of at most 512 tokens, each padded to a power of two (>= 32): new-token counts in one bucket
      share one compiled program;
    - the cache is rebuilt with a full `prefill` of `prompt` when there is none yet or when the reusable
      prefix is shorter than the rest (e.g. after the caller dropped the oldest turns to fit the context);
    - the cache capacity is bucketed as in `generate` (a power of two, at most max_context) and grows by
      copying when the conversation outgrows it;
    - decoding then runs exactly as in `generate` (on the device, or a host loop with `callback`).

    Greedy answers equal `generate`'s full re-prefill (up to float rounding in the logits). After a turn
    the cache holds the prompt and every generated token but the last (sampled, never fed); `tokens` is
    prompt + generated tokens, and `extend(new_tokens, ...)` continues from it. `last_turn` says how the
    turn was prefilled: {"reused", "prefilled", "rebuilt", "generated"}.

    PRNG: the first turn samples with the key `generate(..., seed=seed)` gives a single prompt; the key
    is split after every turn, so later turns draw fresh but reproducible randomness. If a turn raises
    (e.g. KeyboardInterrupt from the callback), the cache is dropped and the next turn rebuilds it.
    """

    def __init__(self, model, *, temperature=0.0, top_k=None, top_p=None, seed: int = 0, stop_tokens=None,
                 max_context: int | None = None, mesh=None, rules=None, cache_dtype=None):
        self.params, self.config = _model_params_config(model)
        _validate_sampling(1, temperature, top_k, top_p)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise GenerationError(f"seed must be an int, got {seed!r}")
        limit = self.config.max_position_embeddings
        if max_context is None:
            max_context = limit
        if isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer)) or max_context < 2:
            raise GenerationError(f"max_context must be an integer >= 2, got {max_context!r}")
        self.max_context = min(int(max_context), limit)
        self._opts = _run_options(self.config, temperature, top_k, top_p, stop_tokens, mesh, rules, cache_dtype)
        self._keys = sequence_keys(int(seed), 1)
        self._cache: KVCache | None = None
        self._cached: list[int] = []       # the ids whose keys/values are in the cache, in slot order
        self.tokens: list[int] = []
        self.last_turn: dict | None = None

    @property
    def cached_length(self) -> int:
        """How many tokens the cache holds."""
        return len(self._cached)

    def reset(self) -> None:
        """Forgets the conversation and its cache (the PRNG key is kept)."""
        self._cache, self._cached, self.tokens = None, [], []

    def extend(self, new_tokens: Sequence[int], *, max_new_tokens: int, callback=None) -> list[int]:
        """Appends new_tokens to `tokens` (the conversation so far) and generates; see `generate`."""
        return self.generate(self.tokens + [int(t) for t in new_tokens], max_new_tokens=max_new_tokens,
                             callback=callback)

    def generate(self, prompt: Sequence[int], *, max_new_tokens: int,
                 callback: Callable[[list[int | None]], None] | None = None) -> list[int]:
        """New tokens after `prompt` (the whole conversation as ids), reusing the cache; callback as in `generate`.

        Raises ContextLengthError when the prompt leaves no room for a new token within max_context.
        """
        prompt = _validate_prompts([prompt], self.config)[0]
        _validate_sampling(max_new_tokens, 0.0, None, None)
        if len(prompt) >= self.max_context:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_context} "
                                     "(max_context), leaving no room for a new token; shorten the conversation")
        n_budget = min(int(max_new_tokens), self.max_context - len(prompt))
        capacity = bucket(min(len(prompt) + int(max_new_tokens), self.max_context), _MIN_PROMPT_BUCKET,
                          cap=self.max_context)
        keep = 0
        for cached, new in zip(self._cached, prompt[:-1]):   # at least one token must be fed
            if cached != new:
                break
            keep += 1
        rebuild = self._cache is None or keep < len(prompt) - keep
        o, params, config = self._opts, self.params, self.config
        budget = np.array([n_budget], np.int32)
        cache, self._cache, self._cached = self._cache, None, []   # dropped unless the turn completes
        try:
            if rebuild:
                del cache
                tokens = np.zeros((1, min(bucket(len(prompt), _MIN_PROMPT_BUCKET), capacity)), np.int32)
                tokens[0, :len(prompt)] = prompt
                cache, first, done = _prefill_and_sample(
                    params, tokens, np.array([len(prompt)], np.int32), self._keys, budget, o.stops, o.temp,
                    o.top_p, config=config, capacity=capacity, cache_dtype=o.cache_dtype, sampler=o.sampler,
                    shard=o.shard)
                keep = 0
            else:
                if cache.k.shape[2] < capacity:
                    cache = _grow_cache(cache, capacity=capacity, shard=o.shard)
                cache = cache._replace(lengths=jnp.asarray(np.array([keep], np.int32)))
                rest = prompt[keep:]
                for start in range(0, len(rest), _MAX_EXTEND_CHUNK):
                    chunk = rest[start:start + _MAX_EXTEND_CHUNK]
                    width = min(bucket(len(chunk), _MIN_PROMPT_BUCKET, cap=_MAX_EXTEND_CHUNK), cache.k.shape[2])
                    tokens = np.zeros((1, width), np.int32)
                    tokens[0, :len(chunk)] = chunk
                    cache, first, done = _extend_and_sample(
                        params, cache, tokens, np.array([len(chunk)], np.int32), self._keys, budget, o.stops,
                        o.temp, o.top_p, config=config, sampler=o.sampler, shard=o.shard)
            out, cache = _run_decode(params, cache, first, done, budget, self._keys, o.stops, o.temp, o.top_p,
                                     n=1, out_len=bucket(n_budget, _MIN_NEW_BUCKET), callback=callback,
                                     config=config, sampler=o.sampler, shard=o.shard)
            new = _trim(out[0], n_budget)
            cached_length = int(np.asarray(cache.lengths)[0])
        except BaseException:
            self.tokens = []
            raise
        self.tokens = prompt + new
        self._cache, self._cached = cache, self.tokens[:cached_length]
        self._keys = _advance_keys(self._keys)
        self.last_turn = {"reused": keep, "prefilled": len(prompt) - keep, "rebuilt": rebuild,
                          "generated": len(new)}
        return new


# ----------------------------------------------------------------------------- text level

class TextStreamer:
    """Turns a stream of token ids into text pieces; a UTF-8 character split across tokens waits for the rest."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], skip_tokens: Sequence[int] = ()):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.skip = set(int(t) for t in skip_tokens)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, token: int | None) -> None:
        if token is None or int(token) in self.skip:
            return
        text = self.decoder.decode(self.tokenizer.decode_bytes([int(token)]))
        if text:
            self.on_text(text)

    def flush(self) -> None:
        text = self.decoder.decode(b"", final=True)
        if text:
            self.on_text(text)


def chat(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 512, on_text=None, **kwargs) -> str:
    """One assistant reply to chat `messages` ([{"role", "content"}, ...]) in the phi-4 chat format.

    Applies the chat template with the generation prompt, generates (kwargs go to `generate`), and
    returns the decoded reply without the closing stop token. `on_text(piece)` streams the reply text.
    """
    prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
    if kwargs.get("stop_tokens") is None:  # the chat format ends answers with <|im_end|>, whatever the config says
        kwargs["stop_tokens"] = sorted(set(default_stop_tokens(model.config)) | set(getattr(tokenizer, "stop_ids", ())))
    return generate_text_from_ids(model, tokenizer, prompt, max_new_tokens=max_new_tokens, on_text=on_text,
                                  **kwargs)


def generate_text_from_ids(model, tokenizer, prompt: list[int], *, max_new_tokens: int, on_text=None,
                           **kwargs) -> str:
    """Generates from one token-id prompt and returns the decoded new text (stop tokens removed)."""
    stops = kwargs.get("stop_tokens")
    stops = default_stop_tokens(model.config) if stops is None else stops
    kwargs["stop_tokens"] = stops
    callback = None
    if on_text is not None:
        streamer = TextStreamer(tokenizer, on_text, skip_tokens=stops)
        callback = lambda column: streamer.put(column[0])  # noqa: E731
    new = generate(model, [prompt], max_new_tokens=max_new_tokens, callback=callback, **kwargs)[0]
    if on_text is not None:
        streamer.flush()
    return tokenizer.decode([t for t in new if t not in set(stops)])


def generate_text(model, tokenizer, text: str, *, max_new_tokens: int, **kwargs) -> str:
    """Plain text completion (no chat template): encodes `text`, generates, decodes the new text."""
    prompt = tokenizer.encode(text, allowed_special="all")
    return generate_text_from_ids(model, tokenizer, prompt, max_new_tokens=max_new_tokens, **kwargs)
