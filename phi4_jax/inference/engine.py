"""`generate` (the public `phi4_jax.generate`) on the serving engine, and the argument checks generation shares.

There is one decode path: `generate`, `ChatSession` (`chat_session`), the chat CLI and PTS rollouts all run their
requests on a `batching.ContinuousBatchingEngine`, driven on the caller's thread (`run_to_completion`), as the
server's requests run on its background thread. `shared_engine` keeps one engine per model (weakly: it goes with
the model), sized for the calls it served: max_batch and max_context are powers of two (>= 1 and >= 32) covering
the largest call so far, and its page pool holds exactly max_batch sequences of max_context tokens. A call that
fits (pages that only idle `HeldSequence`s hold count as free: the engine evicts them) reuses it (and the prefix
cache in it); one that does not gets a larger engine. Engines of the same sizes
share their compiled programs (`batching.engine_step` is a module-level jit), so a new prompt length or token count
does not recompile.

Flow of `generate`: each prompt becomes one request (sequence b sampled with key fold_in(key(seed), b), or
key(seed[b]) for one seed per prompt; the k-th new token with fold_in(that key, k)), all submitted at once; the
engine prefills them in chunks and decodes every admitted request in one batched step until each has hit a stop
token or its budget. A prompt of max_position_embeddings tokens or more raises `ContextLengthError`; a sequence
whose prompt plus max_new_tokens would overflow the context stops when the context is full.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from phi4_jax.checks import check_integer, first_out_of_range, is_integer, is_number
from phi4_jax.inference.errors import ContextLengthError, GenerationError
from phi4_jax.inference.kv_quant import cache_dtype_name
from phi4_jax.inference.sampling import sequence_keys
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.special_tokens import ENDOFTEXT_ID

MIN_CONTEXT_BUCKET = 32


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


def check_options(config: Phi4Config, stop_tokens, mesh, rules, cache_dtype) -> tuple[tuple[int, ...], str | None]:
    """(stop ids, cache dtype name or None) from `generate`'s / `ChatSession`'s arguments; raises GenerationError."""
    if stop_tokens is None:
        stop_tokens = default_stop_tokens(config)
    if isinstance(stop_tokens, (str, bytes)) or not all(is_integer(t) for t in stop_tokens):
        raise GenerationError(f"stop_tokens must be integer token ids, got {stop_tokens!r}")
    if (mesh is None) != (rules is None):
        raise GenerationError("pass both mesh and rules (or neither) to shard generation")
    return tuple(int(t) for t in stop_tokens), cache_dtype_name(cache_dtype)


# ----------------------------------------------------------------------------- one engine per model

_ENGINES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def shared_engine(model, *, batch: int, context: int, mesh=None, rules=None, cache_dtype=None):
    """The model's cached `ContinuousBatchingEngine` for (mesh, rules, cache_dtype) when it fits `batch` sequences
    of up to `context` tokens (slots, context and free pages; same parameter arrays; not running a background
    thread; not failed), else a new one sized for the larger of the two (see the module docstring) that replaces it."""
    from phi4_jax.inference.batching import ContinuousBatchingEngine

    params, config = model_params_config(model)
    key = (mesh, hashable_rules(rules), cache_dtype)
    need_batch = bucket(batch, 1)
    need_context = bucket(context, MIN_CONTEXT_BUCKET, cap=config.max_position_embeddings)
    with _ENGINES_LOCK:
        engines = _ENGINES.setdefault(model, {})
        old = engines.get(key)
        if old is not None and _fits(old, params, need_batch, need_context):
            return old
        if old is not None and old.serves(params):
            need_batch, need_context = max(need_batch, old.max_batch), max(need_context, old.max_context)
        engine = ContinuousBatchingEngine(
            model, max_batch=need_batch, max_context=need_context, kv_cache_bytes=_exact_pool_bytes(
                config, need_batch, need_context, cache_dtype), max_queue=max(64, need_batch), mesh=mesh,
            rules=rules, cache_dtype=cache_dtype)
        engines[key] = engine
        return engine


def _fits(engine, params, batch: int, context: int) -> bool:
    pages = batch * -(-context // engine.page_size)
    return (engine._thread is None and engine._error is None and engine.max_batch >= batch
            and engine.max_context >= context and engine.reclaimable_pages() >= pages
            and engine.serves(params))


def _exact_pool_bytes(config: Phi4Config, batch: int, context: int, cache_dtype) -> int:
    """The bytes of a page pool holding exactly `batch` sequences of `context` tokens (plus the null page)."""
    from phi4_jax.inference.batching import DEFAULT_PAGE_SIZE
    from phi4_jax.inference.paged_cache import page_bytes

    return (batch * -(-context // DEFAULT_PAGE_SIZE) + 1) * page_bytes(config, DEFAULT_PAGE_SIZE, cache_dtype)


def run_streams(engine, streams, callback: Callable[[list[int | None]], None] | None = None) -> list[list[int]]:
    """Drives `engine` on this thread until `streams` finish (`run_to_completion`); returns each one's token ids.

    With a callback, column k (one entry per stream: its k-th new token, or None once it has finished) is passed
    to it as soon as every stream has either produced its k-th token or finished; so the columns are those of a
    batch decoding in lockstep, though the engine prefills the requests one chunk at a time."""
    outs: list[list[int]] = [[] for _ in streams]
    emitted = 0

    def on_step():
        nonlocal emitted
        for out, stream in zip(outs, streams):
            out.extend(event.token_id for event in stream.take_ready())
        if callback is None:
            return
        while (any(len(out) > emitted for out in outs)
               and all(len(out) > emitted or stream.finished for out, stream in zip(outs, streams))):
            callback([out[emitted] if len(out) > emitted else None for out in outs])
            emitted += 1

    engine.run_to_completion(streams, on_step)
    on_step()
    return outs


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
      callback: called with one entry per prompt for each new-token position: its token, or None once it has
        finished (see `run_streams`).
      mesh, rules: a jax Mesh and logical-axis rules table to shard the page pool (kv heads) and activations by
        (the batch is replicated: `batching.serving_rules`).
      cache_dtype: KV cache dtype (default: the model's compute dtype).

    Runs on the model's `shared_engine`. Raises GenerationError for bad arguments, ContextLengthError for a
    prompt that cannot fit.
    """
    from phi4_jax.inference.batching import GenerationRequest

    _, config = model_params_config(model)
    prompts = validate_prompts(prompts, config)
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    stops, cache_dtype = check_options(config, stop_tokens, mesh, rules, cache_dtype)
    keys = np.asarray(jax.random.key_data(sequence_keys(seed, len(prompts))))
    limit = config.max_position_embeddings
    budgets = [min(int(max_new_tokens), limit - len(p)) for p in prompts]
    engine = shared_engine(model, batch=len(prompts), context=max(len(p) + b for p, b in zip(prompts, budgets)),
                           mesh=mesh, rules=rules, cache_dtype=cache_dtype)
    sampling = request_sampling(temperature, top_k, top_p)
    requests = [GenerationRequest(p, b, stop_token_ids=stops, key=k, **sampling)
                for p, b, k in zip(prompts, budgets, keys)]
    return run_streams(engine, engine.submit_many(requests), callback)


def request_sampling(temperature, top_k, top_p) -> dict:
    """`GenerationRequest`'s sampling fields for `generate`'s (validated) arguments."""
    greedy = float(temperature) == 0.0
    return {"temperature": float(temperature), "top_k": None if greedy or top_k is None else int(top_k),
            "top_p": 1.0 if greedy or top_p is None else float(top_p)}
