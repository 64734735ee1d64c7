"""Multi-turn chat on one KV cache (`ChatSession`), streaming text, and text-level helpers.

`ChatSession` keeps the cache between calls: a new turn keeps the longest cached prefix of the conversation
and feeds only the rest with `extend` (in bucketed chunks), then decodes as `generate` does; it rebuilds the
cache with `prefill` when little of it is reusable (e.g. after the oldest turns were dropped).
"""

from __future__ import annotations

import codecs
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from phi4_jax.checks import check_integer, is_integer
from phi4_jax.inference.engine import (
    MIN_NEW_BUCKET,
    MIN_PROMPT_BUCKET,
    advance_keys,
    bucket,
    default_stop_tokens,
    extend_and_sample,
    generate,
    grow_cache,
    model_params_config,
    prefill_and_sample,
    run_decode,
    run_options,
    trim_output,
    validate_prompts,
    validate_sampling,
)
from phi4_jax.inference.errors import ContextLengthError, GenerationError
from phi4_jax.inference.kv_cache import KVCache
from phi4_jax.inference.sampling import sequence_keys

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
        self.params, self.config = model_params_config(model)
        validate_sampling(1, temperature, top_k, top_p)
        if not is_integer(seed):
            raise GenerationError(f"seed must be an int, got {seed!r}")
        limit = self.config.max_position_embeddings
        self.max_context = min(check_integer(limit if max_context is None else max_context, "max_context",
                                             GenerationError, minimum=2), limit)
        self._opts = run_options(self.config, temperature, top_k, top_p, stop_tokens, mesh, rules, cache_dtype)
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
        prompt = validate_prompts([prompt], self.config)[0]
        validate_sampling(max_new_tokens, 0.0, None, None)
        if len(prompt) >= self.max_context:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_context} "
                                     "(max_context), leaving no room for a new token; shorten the conversation")
        n_budget = min(int(max_new_tokens), self.max_context - len(prompt))
        capacity = bucket(min(len(prompt) + int(max_new_tokens), self.max_context), MIN_PROMPT_BUCKET,
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
                tokens = np.zeros((1, min(bucket(len(prompt), MIN_PROMPT_BUCKET), capacity)), np.int32)
                tokens[0, :len(prompt)] = prompt
                cache, first, done = prefill_and_sample(
                    params, tokens, np.array([len(prompt)], np.int32), self._keys, budget, o.stops, o.temp,
                    o.top_p, config=config, capacity=capacity, cache_dtype=o.cache_dtype, sampler=o.sampler,
                    shard=o.shard)
                keep = 0
            else:
                if cache.k.shape[2] < capacity:
                    cache = grow_cache(cache, capacity=capacity, shard=o.shard)
                cache = cache._replace(lengths=jnp.asarray(np.array([keep], np.int32)))
                rest = prompt[keep:]
                for start in range(0, len(rest), _MAX_EXTEND_CHUNK):
                    chunk = rest[start:start + _MAX_EXTEND_CHUNK]
                    width = min(bucket(len(chunk), MIN_PROMPT_BUCKET, cap=_MAX_EXTEND_CHUNK), cache.k.shape[2])
                    tokens = np.zeros((1, width), np.int32)
                    tokens[0, :len(chunk)] = chunk
                    cache, first, done = extend_and_sample(
                        params, cache, tokens, np.array([len(chunk)], np.int32), self._keys, budget, o.stops,
                        o.temp, o.top_p, config=config, sampler=o.sampler, shard=o.shard)
            out, cache = run_decode(params, cache, first, done, budget, self._keys, o.stops, o.temp, o.top_p,
                                     n=1, out_len=bucket(n_budget, MIN_NEW_BUCKET), callback=callback,
                                     config=config, sampler=o.sampler, shard=o.shard)
            new = trim_output(out[0], n_budget)
            cached_length = int(np.asarray(cache.lengths)[0])
        except BaseException:
            self.tokens = []
            raise
        self.tokens = prompt + new
        self._cache, self._cached = cache, self.tokens[:cached_length]
        self._keys = advance_keys(self._keys)
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


def chat_stop_tokens(config, tokenizer) -> list[int]:
    """The ids that end a chat answer: the config's (`default_stop_tokens`) and the tokenizer's (<|im_end|>,
    <|endoftext|>): the chat format ends answers with <|im_end|>, whatever the config says."""
    return sorted(set(default_stop_tokens(config)) | set(getattr(tokenizer, "stop_ids", ())))


def stream_text(run: Callable, tokenizer, stop_tokens: Sequence[int], *, on_text=None, on_token=None
                ) -> tuple[list[int], str]:
    """Runs `run(callback) -> new token ids` (`generate` of one prompt, or `ChatSession.generate`), streaming.

    `on_text(piece)` gets the decoded text as it grows (stop tokens skipped; a UTF-8 character split across
    tokens waits for the rest), `on_token(id)` each new token. Without either, `run` gets callback=None (the
    decode loop then stays on the device). Returns (new ids, their text without stop tokens).
    """
    callback = None
    if on_text is not None or on_token is not None:
        streamer = TextStreamer(tokenizer, on_text or (lambda piece: None), skip_tokens=stop_tokens)

        def callback(column):
            if column[0] is not None and on_token is not None:
                on_token(column[0])
            streamer.put(column[0])

    new = run(callback)
    if callback is not None:
        streamer.flush()
    stops = set(int(t) for t in stop_tokens)
    return new, tokenizer.decode([t for t in new if t not in stops])


def chat_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 512, on_text=None, **kwargs) -> str:
    """One assistant reply to chat `messages` ([{"role", "content"}, ...]) in the phi-4 chat format.

    Applies the chat template with the generation prompt, generates (kwargs go to `generate`; stop tokens
    default to `chat_stop_tokens`), and returns the decoded reply without the closing stop token.
    `on_text(piece)` streams the reply text.
    """
    prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
    if kwargs.get("stop_tokens") is None:
        kwargs["stop_tokens"] = chat_stop_tokens(model.config, tokenizer)
    return generate_text_from_ids(model, tokenizer, prompt, max_new_tokens=max_new_tokens, on_text=on_text,
                                  **kwargs)


def generate_text_from_ids(model, tokenizer, prompt: list[int], *, max_new_tokens: int, on_text=None,
                           **kwargs) -> str:
    """Generates from one token-id prompt (a full prefill) and returns the decoded new text (stop tokens
    removed); `on_text(piece)` streams it; kwargs go to `generate`."""
    if kwargs.get("stop_tokens") is None:
        kwargs["stop_tokens"] = default_stop_tokens(model.config)
    _, text = stream_text(
        lambda callback: generate(model, [prompt], max_new_tokens=max_new_tokens, callback=callback, **kwargs)[0],
        tokenizer, kwargs["stop_tokens"], on_text=on_text)
    return text


def generate_text(model, tokenizer, text: str, *, max_new_tokens: int, **kwargs) -> str:
    """Plain text completion (no chat template): encodes `text`, generates, decodes the new text."""
    prompt = tokenizer.encode(text, allowed_special="all")
    return generate_text_from_ids(model, tokenizer, prompt, max_new_tokens=max_new_tokens, **kwargs)
