"""Multi-turn chat whose conversation stays in the engine's KV pages (`ChatSession`), streaming text, and text-level
helpers.

`ChatSession` runs its turns on the model's `engine.shared_engine` (the one decode path) and keeps the
conversation's pages between turns (a `batching.HeldSequence`): a new turn resumes from them, so only the tokens
after the longest common prefix are prefilled.
"""

from __future__ import annotations

import codecs
import weakref
from typing import Callable, Sequence

import jax
import numpy as np

from phi4_jax.checks import check_integer, is_integer
from phi4_jax.inference.batching import GenerationRequest, HeldSequence
from phi4_jax.inference.engine import (
    check_options,
    default_stop_tokens,
    generate,
    model_params_config,
    request_sampling,
    run_streams,
    shared_engine,
    validate_prompts,
    validate_sampling,
)
from phi4_jax.inference.errors import ContextLengthError, GenerationError
from phi4_jax.inference.sampling import sequence_keys


class ChatSession:
    """Multi-turn generation for one conversation that keeps its KV pages between turns.

    `generate(prompt, ...)` takes the whole conversation so far as token ids (e.g. the chat template
    applied to every message) and returns the new tokens, like `generate(model, [prompt], ...)`, but
    prefills only what the held pages do not already hold: the longest common prefix of `prompt` (all but its
    last token) and the held tokens is kept, so a re-tokenized earlier answer that differs from the generated ids
    is recomputed from the first differing token on, and a conversation whose oldest turns were dropped keeps only
    what still matches (e.g. the system prompt). When nothing matches, the turn may still take pages from the
    engine's prefix cache. An idle session's held pages are evicted when the engine needs pages for other
    requests (least recently held first); its next turn then takes what the prefix cache still holds of the
    conversation and prefills the rest (the same answer).

    The session's engine (`engine.shared_engine`, batch 1, sized for `max_context` tokens) is chosen on the first
    turn and kept. Greedy answers equal `generate`'s full prefill (up to float rounding in the logits). After a
    turn the held pages hold the prompt and every generated token but the last (sampled, never fed); `tokens` is
    prompt + generated tokens, and `extend(new_tokens, ...)` continues from it. `last_turn` says how the turn was
    prefilled: {"reused": prompt tokens not prefilled, "prefilled", "rebuilt": nothing of the held conversation
    was reused, "generated"}.

    PRNG: the first turn samples with the key `generate(..., seed=seed)` gives a single prompt; the key
    is split after every turn, so later turns draw fresh but reproducible randomness. If a turn raises
    (e.g. KeyboardInterrupt from the callback), its pages are freed and the next turn starts afresh.
    """

    def __init__(self, model, *, temperature=0.0, top_k=None, top_p=None, seed: int = 0, stop_tokens=None,
                 max_context: int | None = None, mesh=None, rules=None, cache_dtype=None):
        self.model = model
        self.params, self.config = model_params_config(model)
        validate_sampling(1, temperature, top_k, top_p)
        if not is_integer(seed):
            raise GenerationError(f"seed must be an int, got {seed!r}")
        limit = self.config.max_position_embeddings
        self.max_context = min(check_integer(limit if max_context is None else max_context, "max_context",
                                             GenerationError, minimum=2), limit)
        self._stops, self._cache_dtype = check_options(self.config, stop_tokens, mesh, rules, cache_dtype)
        self._mesh, self._rules = mesh, rules
        self._sampling = request_sampling(temperature, top_k, top_p)
        self._key = sequence_keys(int(seed), 1)[0]
        self._engine = None
        self._held_box: list[HeldSequence | None] = [None]     # what a dropped session's finalizer releases
        weakref.finalize(self, _release_dropped, self._held_box)
        self.tokens: list[int] = []
        self.last_turn: dict | None = None

    @property
    def _held(self) -> HeldSequence | None:
        return self._held_box[0]

    @_held.setter
    def _held(self, held: HeldSequence | None) -> None:
        self._held_box[0] = held

    @property
    def cached_length(self) -> int:
        """How many tokens the held pages hold (0 once the engine evicted them)."""
        held = self._held
        return 0 if held is None or held.pages is None else len(held.tokens)

    def reset(self) -> None:
        """Forgets the conversation and frees its pages (the PRNG key is kept). A session dropped without it (garbage
        collected) has its pages freed by a finalizer (`ContinuousBatchingEngine.release_soon`)."""
        self._release()
        self.tokens = []

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.engine.release(held)

    def extend(self, new_tokens: Sequence[int], *, max_new_tokens: int, callback=None) -> list[int]:
        """Appends new_tokens to `tokens` (the conversation so far) and generates; see `generate`."""
        return self.generate(self.tokens + [int(t) for t in new_tokens], max_new_tokens=max_new_tokens,
                             callback=callback)

    def generate(self, prompt: Sequence[int], *, max_new_tokens: int,
                 callback: Callable[[list[int | None]], None] | None = None) -> list[int]:
        """New tokens after `prompt` (the whole conversation as ids), resuming from the held pages; callback as in
        `generate`.

        Raises ContextLengthError when the prompt leaves no room for a new token within max_context.
        """
        prompt = validate_prompts([prompt], self.config)[0]
        validate_sampling(max_new_tokens, 0.0, None, None)
        if len(prompt) >= self.max_context:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_context} "
                                     "(max_context), leaving no room for a new token; shorten the conversation")
        if self._engine is None:
            self._engine = shared_engine(self.model, batch=1, context=self.max_context, mesh=self._mesh,
                                         rules=self._rules, cache_dtype=self._cache_dtype)
        budget = min(int(max_new_tokens), self.max_context - len(prompt))
        request = GenerationRequest(prompt, budget, stop_token_ids=self._stops,
                                    key=np.asarray(jax.random.key_data(self._key)), **self._sampling)
        held, self._held, self.tokens = self._held, None, []     # used up by this turn, whatever happens
        try:
            stream = self._engine.submit(request, hold=True, resume=held)
        except BaseException:
            if held is not None:
                self._engine.release(held)
            raise
        new = run_streams(self._engine, [stream], callback)[0]
        self._held = stream.held
        self.tokens = prompt + new
        self._key = jax.random.split(self._key)[1]
        reused = stream.cached_tokens
        self.last_turn = {"reused": reused, "prefilled": len(prompt) - reused,
                          "rebuilt": held is None or reused == 0, "generated": len(new)}
        return new


def _release_dropped(held_box: list) -> None:
    """A garbage-collected session's finalizer: frees its held pages (without blocking on the engine's lock)."""
    held, held_box[0] = held_box[0], None
    if held is not None:
        held.engine.release_soon(held)


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
    tokens waits for the rest), `on_token(id)` each new token. Without either, `run` gets callback=None.
    Returns (new ids, their text without stop tokens).
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
