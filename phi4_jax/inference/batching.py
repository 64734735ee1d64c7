"""The serving engine: continuous batching over a paged KV cache, with chunked prefill and prefix caching.

`ContinuousBatchingEngine(model, ...)` owns a page pool (`paged_cache`) and a fixed number of decode slots
(`max_batch`). `submit(GenerationRequest)` queues a request and returns its `RequestStream`, an iterator (sync or
async) of `TokenEvent`s; `submit_many` queues several together (all or none; the same step plans with all).
A background thread (`start()`) runs the step loop; each engine step

1. gives every request that decodes this step the page its next position needs, when it crosses a page boundary
   (`_grow_pages`; preempting when the pool has none, below), then admits waiting requests (first come, first
   served) into free slots while the pool has pages for their prompt: the longest cached prefix of the prompt's
   full pages is taken from the prefix cache (not prefilled again), and pages for the rest of the prompt are taken
   (pages for new tokens come one at a time, as the request needs them);
2. prefills one chunk of the oldest request still prefilling: at most `prefill_chunk` tokens while some request
   decodes (so running streams wait at most one chunk per token), at most `max_prefill_chunk` while none does,
   padded to a bucket (powers of two from 16, `prefill_chunk` and `max_prefill_chunk`); the chunk that ends its
   prompt samples its first token;
3. runs one decode step for every request that is decoding, one token each, in one program sized to them (row
   buckets: powers of two up to max_batch, and max_batch): the n decoding requests take the first n rows of the
   smallest bucket that holds them, so one request runs a one-row program, not max_batch rows. A request's row may
   change from step to step (its keys/values are in the shared page pool, reached through its block table; its
   sampling key and step go with it).

So new requests join and finished ones leave the running batch at token granularity, and a long prompt does not
starve running streams (they advance every step). Every program has a fixed shape (the decode step [row bucket,
1]; a prefill chunk [1, chunk bucket]; block tables [*, width] with the width bucketed: powers of two of pages from
MIN_TABLE_TOKENS' worth up to max_context / page_size, the narrowest that holds the step's positions, so attention
costs the pages in use, not max_context), sampling settings are per-row arrays, so nothing recompiles per request
(`start` compiles every shape in `program_shapes` first: row buckets x table widths decode programs plus chunk
buckets x table widths prefill programs).

Dispatch-ahead: step k+1 is dispatched before step k's tokens are fetched. Its decode rows take their input token
from step k's sampled tokens still on the device (`engine_step`'s `feed`; every program returns them padded to
max_batch, so the fed-token inputs have one shape whatever the rows of either step), so the host only uploads
block tables and settings and reads each step's tokens (with their logprobs, one transfer) one step behind, for
streaming and stop checks. The host knows each request's positions and budget ahead; only a stop token is learned
late: a request that stopped at step k has had step k+1 computed, whose token is dropped (never streamed) and whose
key/value went into its own page past what the prefix cache holds; its slot and pages are freed when step k is
read. Cancelling frees them at once the same way (later steps are queued after the in-flight one).

The layer math is the model's own (`paged_cache.paged_extend`), attending with `kernels.paged_attention` (the
Pallas TPU kernel for attention_impl "pallas_tpu" or on a TPU, the Pallas GPU kernel for "pallas_gpu", in shard_map
on a mesh; see `paged_cache.attend_pages`). On the CPU
backend (`paged_layers.per_layer_decode`'s rule) the engine keeps its own per-layer copy of the layer weights and a
per-layer page pool, made once at construction (`paged_layers`), and runs `paged_layers.paged_extend_per_layer`;
it keeps no reference to the model's stacked layer weights (only weak ones, for `serves`), so a caller that drops
the model holds one copy of the layers, not two.

Prefill chunk sizes and one chunk per step, measured on the CPU backend (2 shared cores, load 10-13; a prefill
program of the 87M-shaped bench model, hidden 384, 6 layers, vocab 100352, minimum of 9 interleaved runs): [1, 128]
2933 prompt tokens/s, [1, 256] 3971, [1, 512] 1652, two requests' chunks in one program [2, 128] 2879, [4, 64] 2423;
with the 8K vocabulary (15 runs) [1, 128] 3956, [1, 256] 4267, [1, 512] 1075, [2, 128] 4118. So a larger chunk
pays up to 256 tokens (the lm_head and the per-step work are paid once per chunk) and not beyond (XLA:CPU is
several times slower per token at 512): max_prefill_chunk defaults to IDLE_CHUNK_FACTOR (2) x prefill_chunk, 256
for the CLI's and `generate`'s 128 (a larger default would also add prefill programs to compile). Several
requests' chunks in one program cost what the same chunks cost one after another (a prefill's cost is its tokens,
whichever request they belong to) and would multiply the compiled shapes by prefill row buckets, so a step
prefills one request's chunk; requests whose prefill is done decode together.

Sampling follows `sampling.sample_rows` with per-request settings (temperature, top_k, top_p) and keys: the k-th
new token of a request with seed s is drawn with key fold_in(key(s), k), as `generate(..., seed=[s])` draws it (a
request may bring its own key instead: `GenerationRequest.key`); temperature 0 is greedy.

The engine runs either on its background thread (`start`, for the server) or on the caller's thread
(`run_to_completion`, for `generate`, `ChatSession` and PTS rollouts); both run the same `_step`. A request
submitted with `hold=True` keeps its pages when it ends (`RequestStream.held`, a `HeldSequence`), and a later
request that continues the same token sequence resumes from them (`submit(..., resume=held)`): only the tokens
after the longest common prefix are prefilled (`ChatSession` keeps a conversation this way).

Preemption (recompute, as vLLM does): when the pool has no page for a decoding request's next position, the running
request submitted last is preempted (`_preempt`; it may be the one that needs the page): its full written pages go to
the prefix cache, all its pages and its slot are freed, and it goes back to the head of the queue with the tokens
it streamed appended to its prompt. Re-admitted, it prefills them again (mostly from the prefix cache when its pages
were not evicted meanwhile) and continues its stream where it stopped: no token is streamed twice, and its k-th new
token is still drawn with fold_in(key, k), so seeded and greedy output equal an unpreempted run's. A step of it
still in flight (dispatch-ahead) is dropped when fetched (`_Running.dropped_through`): its token is sampled again
by the recompute, and the key/value it wrote went past the positions the prefix cache holds. The oldest running
request is never preempted for a newer one, and a request whose prompt + max_new_tokens cannot fit the pool
alone is refused at submit, so the pool never deadlocks on running requests. `stats()["preemptions"]` counts them,
`stats()["recomputed_tokens"]` the positions they prefill again (apart from `prefill_tokens`, the first prefills).
A preempted request was accepted, so it goes back to the queue even when `max_queue` requests wait already (the
queue may then exceed max_queue by at most max_batch); `submit` counts it like any waiting request, so a queue
that is full with preempted requests refuses new ones (QueueFullError).

Held sequences are evictable: when the pool has no page for a request's admission or growth, the `HeldSequence`s
(those a caller holds and those waiting to be resumed) are evicted least recently used (held) first, before any
running request is preempted: their full pages stay in the prefix cache (registered when their request ended) and
all their pages are freed; the HeldSequence is marked `evicted`. Resuming an evicted one takes its prompt's full
pages from the prefix cache where they were not reused meanwhile and prefills the rest (the same tokens as a resume
from the held pages). So idle held conversations (`ChatSession`s between turns) never keep new requests out.
`stats()["held_evictions"]` counts them.

Prompt logprobs (`GenerationRequest.prompt_logprobs`: echo + logprobs, lm-evaluation-harness's log-likelihood) are
computed by the request's own prefill chunks, queued, admitted and interleaved with running decodes like any
request: every prefill program also returns, at each position of its chunk, the logprob of the next prompt token
and the top-k there (`position_logprobs`: the lm_head, log-softmax and top-k over the chunk's final hidden states,
PROMPT_LOGPROBS_ROWS positions at a time), under a conditional taken only for a chunk whose request asked, so other
prefills pay a skipped branch and nothing compiles per request (the warm-up compiles the branch with the prefill
programs); decode programs are unchanged. The host fetches those outputs only for such chunks
(`RequestStream.prompt_logprobs`, complete before the request's first token event, or its end when it asked for no
new token: max_new_tokens 0). As vLLM does, such a request takes no prompt page from the prefix cache (it needs
every position's logits), but its full pages are registered as usual, so a later request with the same prefix
reuses them.

A request ends when it samples one of its `stop_token_ids` (that token is its last event; finish_reason
"stop"), after `max_new_tokens` tokens or when the context is full ("length"), or when cancelled ("cancelled":
its slot and pages are freed at once, and its full pages stay in the prefix cache).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import os
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_native
from phi4_jax.checks import check_integer, is_integer
from phi4_jax.inference.compile_ahead import compile_ahead
from phi4_jax.inference.engine import (
    MeshRules,
    hashable_rules,
    mesh_rules_context,
    model_params_config,
    validate_prompts,
    validate_sampling,
)
from phi4_jax.inference.errors import ContextLengthError, EngineError, GenerationError, QueueFullError
from phi4_jax.inference.kv_quant import cache_dtype_name, is_int8
from phi4_jax.inference.paged_cache import (
    NULL_PAGE,
    PagedKV,
    PagePool,
    init_pages,
    page_bytes,
    page_digests,
    paged_extend,
    paged_implementation,
)
from phi4_jax.inference.paged_layers import (
    init_pages_per_layer,
    paged_extend_per_layer,
    per_layer_decode,
    per_layer_params,
)
from phi4_jax.inference.sampling import sample_rows
from phi4_jax.model import sharding
from phi4_jax.model.decoder import logits_from_hidden

MAX_TOP_LOGPROBS = 20            # the most alternatives a request may ask for (the OpenAI API's limit)
MIN_CHUNK_BUCKET = 16
IDLE_CHUNK_FACTOR = 2           # max_prefill_chunk's default, times prefill_chunk (see the module docstring)
DEFAULT_PAGE_SIZE = 16
PROMPT_LOGPROBS_ROWS = 128      # prompt positions whose [rows, vocab] log-softmax exists at once (prefill)
MIN_TABLE_TOKENS = 256           # the narrowest block-table bucket covers at least this many positions
KV_MEMORY_FRACTION = 0.8         # of the device's free memory, when it reports one and no budget is given
FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class GenerationRequest:
    """One completion to generate. `logprobs`: None for none; k >= 0 for the sampled token's logprob plus the
    top-k alternatives' (k <= MAX_TOP_LOGPROBS). `prompt_logprobs`: None, or k >= 0 for each prompt token's
    logprob given the tokens before it plus the top-k alternatives there (`RequestStream.prompt_logprobs`; computed
    by the request's own prefill chunks, see the module docstring); with it, max_new_tokens may be 0 (score the
    prompt only)."""
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    top_k: int | None = None
    key: Any = None    # PRNG key data (`jax.random.key_data` of one key) to sample with instead of key(seed)
    prompt_logprobs: int | None = None   # k >= 0: score the prompt too (`RequestStream.prompt_logprobs`)


@dataclass
class HeldSequence:
    """The pages a finished `hold=True` request kept: `tokens` are the ids whose keys/values they hold, in order.
    Pass it to `submit(..., resume=held)` to continue the sequence, or to `release` to free the pages. When the pool
    runs short the engine may evict it (`evicted` True, `pages` None): a resume then prefills what the prefix cache
    no longer holds. Resumed or released, it is used up (`pages` None, `evicted` False)."""
    engine: "ContinuousBatchingEngine"
    tokens: list[int]
    pages: list[int] | None
    evicted: bool = False


@dataclass
class TokenEvent:
    """One new token; logprob and top_logprobs ((token id, logprob), most likely first) when asked for (logprobs
    of the model's distribution, before temperature and top_p)."""
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


class RequestStream:
    """The tokens of one request as they are generated: iterate it (`for`) or `async for` over it. After the
    last event, `finish_reason` is "stop", "length" or "cancelled". `cancel()` ends the request at once (its slot
    and pages are freed). If the engine fails, iteration raises `EngineError`."""

    def __init__(self, engine: "ContinuousBatchingEngine", prompt_tokens: int):
        self._engine = engine
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._events: deque[TokenEvent] = deque()
        self._waker: tuple[Any, asyncio.Event] | None = None
        self._error: BaseException | None = None
        self.finish_reason: str | None = None
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0                 # prompt tokens not prefilled (resumed or from the prefix cache)
        self.held: HeldSequence | None = None  # a hold=True request's pages, once it ended with "stop" or "length"
        # With GenerationRequest.prompt_logprobs: one entry per prompt token (None for the first: nothing predicts
        # it), a TokenEvent for each other, all filled before the first token event (or the end, for 0 new tokens).
        self.prompt_logprobs: list[TokenEvent | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self._error is not None

    def cancel(self) -> None:
        """Stops generation now: frees the request's slot and pages and drops the events not yet read, so
        iteration ends (no-op once finished)."""
        self._engine._cancel(self)
        with self._lock:
            self._events.clear()

    # -- producer side (the engine) --
    def _notify(self) -> None:
        self._ready.notify_all()
        if self._waker is not None:
            loop, event = self._waker
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:   # the consumer's loop is closed: nobody is listening any more
                pass

    def _push(self, event: TokenEvent) -> None:
        with self._lock:
            self._events.append(event)
            self.completion_tokens += 1
            self._notify()

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        with self._lock:
            if self.finished:
                return
            self.finish_reason, self._error = reason, error
            self._notify()

    # -- consumer side --
    def take_ready(self) -> list[TokenEvent]:
        """The events generated so far and not yet read, without waiting."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def _pop(self):
        """(True, event) or (False, None) when finished and drained; raises the engine's error."""
        if self._events:
            return True, self._events.popleft()
        if self._error is not None:
            raise EngineError(f"the serving engine failed: {self._error}") from self._error
        if self.finish_reason is not None:
            return False, None
        return None

    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        with self._lock:
            while (got := self._pop()) is None:
                self._ready.wait()
        if not got[0]:
            raise StopIteration
        return got[1]

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                got = self._pop()
                if got is None:
                    if self._waker is None or self._waker[0] is not loop:
                        self._waker = (loop, asyncio.Event())
                    event = self._waker[1]
                    event.clear()
            if got is not None:
                if not got[0]:
                    raise StopAsyncIteration
                return got[1]
            await event.wait()


@dataclass
class _Running:
    """Engine-side state of one admitted or waiting request."""
    stream: RequestStream
    prompt: list[int]
    budget: int                       # new tokens it may generate
    key: np.ndarray                   # PRNG key data
    temperature: float
    top_k: int                        # 0: no limit
    top_p: float
    stops: frozenset
    logprobs: int | None
    order: int                        # submission order (prefill is first come, first served)
    hold: bool = False                # keep the pages when it ends (`HeldSequence`)
    resume: HeldSequence | None = None
    slot: int = -1
    pages: list | None = None
    kv_len: int = 0                   # positions whose keys/values are written (by steps already fetched)
    registered: int = 0               # leading pages already put in the prefix cache
    last_token: int = -1
    generated: int = 0
    generated_ids: list = field(default_factory=list)
    fed: int = 0                      # positions written by the steps dispatched so far (>= kv_len)
    sampled: int = 0                  # tokens sampled by the steps dispatched so far (>= generated)
    source: tuple | None = None       # (step id, index in that step's token carry) of its newest sampled token
    preempted: int = 0                # times preempted (its prompt then holds the tokens streamed before)
    dropped_through: int = -1         # results of steps up to this id are dropped (dispatched before a preemption)
    written_before: int = 0           # positions written before a preemption: prefilling them again is recomputation
    prompt_top_k: int = 0             # alternatives per prompt position when scoring the prompt
    scoring: bool = False             # its prefill chunks still owe prompt logprobs (`_score_prompt`)


@dataclass
class _Pending:
    """A dispatched engine step whose tokens the host has not fetched yet."""
    step_id: int
    prefill: _Running | None
    chunk: int | None
    decoding: list                    # the decode step's rows (None: idle)
    p_out: Any                        # device outputs of the prefill chunk / the decode step (or None)
    d_out: Any
    carry: tuple                      # its sampled tokens as the next step reads them: (decode, prefill), each
                                      # [max_batch] whatever the step's rows (`engine_step`)


# ----------------------------------------------------------------------------- the compiled programs

@functools.partial(jax.jit, static_argnames=("config", "top_k", "shard"), donate_argnames=("pages",))
def engine_step(params, pages, tokens, feed, prev_decode, prev_prefill, start, n_new, block_tables, keys, steps,
                temperature, sample_top_k, top_p, want_logprobs, targets=None, want_prompt_logprobs=None, *, config,
                top_k, shard):
    """`paged_extend` and sample (`sample_rows`; keys: PRNG key data [B, ...]): returns (pages, tokens [C], the
    sampled token's logprob [B], top-k ids [B, k], logprobs [B, k]). tokens[:B] are the B rows' sampled tokens,
    zero-padded to C = len(prev_decode) (the engine's max_batch), so that the next step's fed-token inputs have one
    shape whatever this step's rows (no program shape multiplies by the previous step's).

    Row b's first token is tokens[b, 0] where feed[b] < 0, else entry feed[b] of the previous step's sampled tokens
    (still on the device: the host has not fetched them yet): its decode step's prev_decode [C], then its prefill
    chunk's prev_prefill. Params in the per-layer layout (a list of layers,
    `paged_layers.per_layer_params`) take `paged_extend_per_layer`, stacked ones `paged_extend`. The logprobs are
    computed only when `want_logprobs` (a traced bool: some row asked for them), else zeros.

    With `targets` [1, T] (prefill programs; the token after each position), three more outputs: row 0's
    `position_logprobs` at every position of the chunk, computed only when `want_prompt_logprobs` (a traced bool:
    the chunk's request scores its prompt), else zeros."""
    with mesh_rules_context(shard):
        fed = jnp.take(jnp.concatenate([prev_decode, prev_prefill]), jnp.maximum(feed, 0), mode="clip")
        tokens = tokens.at[:, 0].set(jnp.where(feed >= 0, fed, tokens[:, 0]))
        extend = paged_extend_per_layer if isinstance(params["layers"], list) else paged_extend
        prompt_out = ()
        if targets is None:
            pages, logits = extend(params, pages, tokens, start, n_new, block_tables, config)
        else:
            pages, logits, hidden = extend(params, pages, tokens, start, n_new, block_tables, config,
                                           return_hidden=True)
            prompt_out = position_logprobs(params, hidden[0], targets[0], want_prompt_logprobs, config=config,
                                           top_k=top_k)
        # the CPU layout's greedy argmax and top-k/top-p restriction are native where they build (XLA:CPU's argmax
        # reads the vocabulary at ~1 GB/s; its masks are 31-32 reductions over [B, V] each)
        native = extend is paged_extend_per_layer
        argmax = cpu_native.argmax if native and cpu_native.available("phi4_cpu_argmax") else None
        restrict = (cpu_native.sampling_filter if native and cpu_native.available("phi4_cpu_sampling_filter")
                    else None)
        token = sample_rows(logits, jax.random.wrap_key_data(keys), steps, temperature, sample_top_k, top_p,
                            argmax=argmax, restrict=restrict)
        padded = jnp.zeros(prev_decode.shape, jnp.int32).at[:token.shape[0]].set(token)

        chosen = jax.lax.cond(want_logprobs, lambda: token_logprobs(logits, token, top_k),
                              lambda: no_logprobs(logits.shape[0], top_k))
        return pages, padded, *chosen, *prompt_out


def token_logprobs(logits, token, top_k: int):
    """For logits [N, V] and a token per row [N]: (its logprob [N], the top-k ids [N, k] and logprobs [N, k])."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    top_logp, top_ids = jax.lax.top_k(logp, top_k)
    return token_logp, top_ids.astype(jnp.int32), top_logp


def no_logprobs(n: int, top_k: int):
    """`token_logprobs`' shapes, zeros: the branch taken when nothing asked for logprobs."""
    return jnp.zeros((n,), jnp.float32), jnp.zeros((n, top_k), jnp.int32), jnp.zeros((n, top_k), jnp.float32)


def position_logprobs(params, hidden, targets, want, *, config, top_k, rows=PROMPT_LOGPROBS_ROWS):
    """For final-normed hidden states [T, E] and the token after each position, targets [T]: (the logprob of
    targets[t] at position t [T], the top-k ids [T, k] and logprobs [T, k] there), computed only when `want` (a
    traced bool; else zeros, at the cost of a conditional). The lm_head, log-softmax and top-k run `rows` positions
    at a time (`lax.map`), so float32 logits exist for [rows, vocab] at once, never [T, vocab]."""
    n, rows = hidden.shape[0], min(rows, hidden.shape[0])

    def compute():
        pad = -n % rows
        h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, rows, hidden.shape[-1])
        t = jnp.pad(targets, (0, pad)).reshape(-1, rows)

        def chunk(xs):   # [rows, V] float32 logits at a time
            h_i, t_i = xs
            return token_logprobs(logits_from_hidden(params, h_i, config), t_i, top_k)

        token_logp, top_ids, top_logp = jax.lax.map(chunk, (h, t))
        return token_logp.reshape(-1)[:n], top_ids.reshape(-1, top_k)[:n], top_logp.reshape(-1, top_k)[:n]

    return jax.lax.cond(want, compute, lambda: no_logprobs(n, top_k))


@functools.partial(jax.jit, static_argnames=("config", "num_pages", "page_size", "dtype", "shard", "per_layer"))
def _new_pages(*, config, num_pages, page_size, dtype, shard, per_layer=False):
    if per_layer:
        return init_pages_per_layer(config, num_pages, page_size, dtype)
    with mesh_rules_context(shard):
        return init_pages(config, num_pages, page_size, dtype)


@functools.cache
def _key_data_shape() -> tuple[int, ...]:
    """The shape of one PRNG key's data under the default implementation."""
    return tuple(jax.random.key_data(jax.random.key(0)).shape)


def _free_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def serving_rules(rules=None) -> dict:
    """The rules table the engine shards by on a mesh: `rules` (default: the training table) with the batch
    replicated (decode slots are few) and the page pool's page axes whole; kv heads split as the table says."""
    return {**(sharding.TRAINING_RULES if rules is None else dict(rules)), "batch": None, "kv_pages": None,
            "page_rows": None}


# ----------------------------------------------------------------------------- the engine

class ContinuousBatchingEngine:
    """Continuous batching with a paged KV cache (see the module docstring).

    Args:
      model: a phi4_jax model (`load_model`, `model_from_params`).
      max_batch: decode slots (requests generating at once).
      max_context: longest prompt + completion (default: the model's max_position_embeddings).
      page_size: tokens per KV page.
      kv_cache_bytes: the page pool's size in bytes (default: KV_MEMORY_FRACTION of the device's free memory
        where the backend reports it, else enough pages for max_batch requests of max_context tokens).
      prefill_chunk: most prompt tokens prefilled per engine step while some request decodes (at most
        max_context): bounds how long a prefill holds up the running streams.
      max_prefill_chunk: most prompt tokens prefilled per engine step while no request decodes (default:
        IDLE_CHUNK_FACTOR x prefill_chunk; at least prefill_chunk, at most max_context).
      max_queue: most requests waiting for a slot; `submit` raises QueueFullError beyond it.
      mesh: a jax Mesh to shard the page pool (kv heads) and activations over (rules: `serving_rules(rules)`); the
        model's parameters should be sharded on it already (`load_model(..., mesh=...)`).
      rules: the logical-axis rules table for the mesh (default: the training table).
      cache_dtype: the page pool's dtype: None (the model's compute dtype), "bfloat16", "float16", "float32", or
        "int8" (int8 pages with a float32 scale per token and kv head: about 2x the tokens of bf16 in
        kv_cache_bytes; see `kv_quant`).
    """

    def __init__(self, model, *, max_batch=8, max_context=None, page_size=DEFAULT_PAGE_SIZE, kv_cache_bytes=None,
                 prefill_chunk=128, max_queue=64, mesh=None, rules=None, cache_dtype=None, max_prefill_chunk=None):
        self.params, self.config = model_params_config(model)
        limit = self.config.max_position_embeddings
        for name, value in (("max_batch", max_batch), ("page_size", page_size), ("prefill_chunk", prefill_chunk),
                            ("max_queue", max_queue)):
            check_integer(value, name, GenerationError)
            if value < 1:
                raise GenerationError(f"{name} must be >= 1, got {value}")
        if max_context is None:
            max_context = limit
        check_integer(max_context, "max_context", GenerationError)
        if not 2 <= max_context <= limit:
            raise GenerationError(f"max_context must be in [2, {limit}] (the model's max_position_embeddings), "
                                  f"got {max_context}")
        self.max_batch, self.max_context, self.page_size = int(max_batch), int(max_context), int(page_size)
        # A chunk never needs to be longer than the context (a longer one would pad every prefill past it).
        self.prefill_chunk, self.max_queue = min(int(prefill_chunk), self.max_context), int(max_queue)
        self.max_prefill_chunk = self._max_prefill_chunk(max_prefill_chunk)
        self.table_width = -(-self.max_context // self.page_size)
        self.top_k = min(MAX_TOP_LOGPROBS, self.config.vocab_size)
        self.shard = None if mesh is None else MeshRules(mesh, hashable_rules(serving_rules(rules)))
        self.cache_dtype = cache_dtype_name(cache_dtype)
        per_page = page_bytes(self.config, self.page_size, self.cache_dtype)
        if kv_cache_bytes is None:
            free = _free_device_bytes()
            if free is not None:
                kv_cache_bytes = int(free * KV_MEMORY_FRACTION)
            else:
                kv_cache_bytes = (self.max_batch * self.table_width + 1) * per_page
        check_integer(kv_cache_bytes, "kv_cache_bytes", GenerationError)
        num_pages = int(kv_cache_bytes) // per_page
        if num_pages < 2:
            raise GenerationError(f"kv_cache_bytes={kv_cache_bytes} holds {num_pages} pages of {per_page} bytes; "
                                  "the engine needs at least 2 (one is the null page)")
        self.pool = PagePool(num_pages, self.page_size)
        # On the CPU backend the step runs on a per-layer copy of the layer weights and a per-layer page pool,
        # made once here (`paged_layers`; `paged_layers.per_layer_decode` says when: unsharded, XLA attention, the copy
        # within a quarter of physical memory; float pages, not int8); elsewhere on the model's stacked params and a
        # stacked pool.
        self.per_layer = (per_layer_decode(self.params, self.config, self.shard) and not is_int8(self.cache_dtype)
                          and paged_implementation(self.config) != "pallas_gpu")
        self.step_params = (per_layer_params(self.params, compute_dtype=self.config.compute_dtype) if self.per_layer
                            else self.params)
        self._layer_refs = None
        if self.per_layer:      # nothing runs on the stacked layers any more: keep no second copy of them alive
            self._layer_refs = [weakref.ref(w) for w in jax.tree.leaves(self.params["layers"])]
            self.params = dict(self.params, layers=None)
        self.pages: PagedKV = _new_pages(config=self.config, num_pages=num_pages, page_size=self.page_size,
                                         dtype=self.cache_dtype, shard=self.shard, per_layer=self.per_layer)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Running] = deque()
        self._slots: list[_Running | None] = [None] * self.max_batch
        self._thread: threading.Thread | None = None
        self._driving = threading.Lock()   # one caller thread at a time runs steps (`run_to_completion`)
        self._stopping = False
        self._error: BaseException | None = None
        self._prefix_cache_hits = 0
        self._preemptions = 0
        self._held: dict[int, HeldSequence] = {}        # id -> the evictable held sequences, least recently held first
        self._held_evictions = 0
        self._dropped_held: deque[tuple] = deque()      # (held, pages) of `release_soon`, freed at the next admission
        self._prefill_tokens = 0
        self._recomputed_tokens = 0     # prompt positions prefilled again after a preemption (not in _prefill_tokens)
        self._tokens_generated = 0
        self._warm = False
        self._order = itertools.count()
        self._steps = 0                 # engine steps dispatched; the next step's id
        self._pending: _Pending | None = None     # the step dispatched last, its tokens not fetched yet
        # Placed like a step's token outputs (committed to the device / replicated on the mesh): a host array
        # in their place would compile each program a second time.
        placement = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None
                     else jax.local_devices()[0])
        self._zero_carry = jax.device_put((np.zeros((self.max_batch,), np.int32),) * 2, placement)
        if mesh is None:   # a fresh pool is uncommitted, a step's output pool committed: the first program
            self.pages = jax.device_put(self.pages, placement)   # warmed up would compile again on the first step

    # -- public API --
    def start(self, progress: bool = False) -> "ContinuousBatchingEngine":
        """Compiles every program shape (`warmup`; a tqdm bar with `progress`), then runs the step loop in a
        background thread."""
        if self._thread is not None:
            raise GenerationError("the engine is already started")
        self.warmup(progress)
        self._thread = threading.Thread(target=self._loop, name="phi4-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stops the step loop; requests still waiting or running end with finish_reason "cancelled"."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for req in list(self._waiting) + [r for r in self._slots if r is not None]:
                self._end(req, "cancelled")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    def submit(self, request: GenerationRequest, *, hold: bool = False,
               resume: HeldSequence | None = None) -> RequestStream:
        """Queues a request; returns its stream. Raises GenerationError for bad settings, ContextLengthError when
        the prompt leaves no room for a new token, QueueFullError when max_queue requests are waiting (preempted
        ones included).

        hold: keep the request's pages when it ends with "stop" or "length" (`stream.held`, a `HeldSequence`;
          a cancelled request frees them). resume: a `HeldSequence` of this engine to continue: the request keeps
          the pages of the longest common prefix of `resume.tokens` and its prompt (all but the prompt's last
          token) and prefills only the rest; its other pages are freed (`resume` is used up either way). An
          evicted `resume` is accepted: the request takes its prompt's pages from the prefix cache instead.
        """
        req = self._validate(request)
        req.hold = bool(hold)
        if resume is not None and req.scoring:
            raise GenerationError("a request that scores its prompt (prompt_logprobs) cannot resume a HeldSequence: "
                                  "it prefills its whole prompt")
        with self._lock:
            if resume is not None:
                if (not isinstance(resume, HeldSequence) or resume.engine is not self
                        or (resume.pages is None and not resume.evicted)):
                    raise GenerationError("resume must be a HeldSequence of this engine that was not resumed or "
                                          "released already")
                req.resume = resume
            self._check_room(1)
            if resume is not None:
                pages = self._unhold(resume)
                req.resume = None if pages is None else self._new_held(resume.tokens, pages)
            self._waiting.append(req)
            self._wake.notify_all()
        return req.stream

    def submit_many(self, requests: Sequence[GenerationRequest], *, hold: bool = False) -> list[RequestStream]:
        """Queues `requests` together, in order, and returns their streams: every request is checked first and
        they join the queue at once (one step plans with all of them), or none does. Raises as `submit`; the
        queue must have room for all of them (QueueFullError otherwise; GenerationError when there are more
        than max_queue, which no wait would fix). `hold` as `submit`'s, for each."""
        reqs = [self._validate(request) for request in requests]
        if not reqs:
            return []
        if len(reqs) > self.max_queue:
            raise GenerationError(f"{len(reqs)} requests submitted together exceed the engine's queue "
                                  f"(max_queue={self.max_queue})")
        for req in reqs:
            req.hold = bool(hold)
        with self._lock:
            self._check_room(len(reqs))
            self._waiting.extend(reqs)
            self._wake.notify_all()
        return [req.stream for req in reqs]

    def _check_room(self, n: int) -> None:
        """Raises unless `n` more requests may join the queue now (under the lock)."""
        if self._error is not None:
            raise EngineError(f"the serving engine failed: {self._error}")
        if self._stopping:
            raise EngineError("the serving engine is shut down")
        if len(self._waiting) + n > self.max_queue:
            raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})"
                                 + (f" and {n} were submitted together" if n > 1 else "") + "; retry later")

    def release(self, held: HeldSequence) -> None:
        """Frees the pages of a `HeldSequence` (their full pages stay in the prefix cache); a no-op when it was
        released or resumed already."""
        with self._lock:
            if held.engine is self:
                self.pool.release(self._unhold(held) or [])

    def release_soon(self, held: HeldSequence) -> None:
        """`release` without waiting for the engine's lock, for finalizers (a garbage collection may run them on any
        thread, the engine's own in the middle of a step included): the pages are freed at once when the lock is free,
        else at the engine's next admission (or `stats()`)."""
        if held.engine is not self:
            return
        pages, held.pages = held.pages, None
        if pages is None:
            return
        self._dropped_held.append((held, pages))  # deque.append is atomic: no lock needed
        if self._lock.acquire(blocking=False):
            try:
                self._free_dropped_held()
                self._wake.notify_all()
            finally:
                self._lock.release()

    def reclaimable_pages(self) -> int:
        """Pages a new request can get: the pool's free and evictable ones plus those only `HeldSequence`s hold
        (evicted for it when needed)."""
        with self._lock:
            self._free_dropped_held()
            held = collections.Counter(page for h in self._held.values() if h.pages is not None for page in h.pages)
            return self.pool.available() + sum(self.pool.refcount[page] == n for page, n in held.items())

    def _free_dropped_held(self) -> None:
        while self._dropped_held:
            held, pages = self._dropped_held.popleft()
            if self._held.get(id(held)) is held:
                del self._held[id(held)]
            self.pool.release(pages)

    def _new_held(self, tokens: list[int], pages: list[int]) -> HeldSequence:
        """A HeldSequence of `pages`, registered as the most recently held (evicted last)."""
        held = HeldSequence(self, tokens, pages)
        self._held[id(held)] = held
        return held

    def _unhold(self, held: HeldSequence) -> list[int] | None:
        """Uses a HeldSequence up: returns the pages it held (None when evicted, released or resumed already; the
        caller frees or keeps them) and forgets it."""
        if self._held.get(id(held)) is held:
            del self._held[id(held)]
        pages, held.pages, held.evicted = held.pages, None, False
        return pages

    def _evict_held(self) -> bool:
        """Evicts the least recently held HeldSequence (see the module docstring): frees its pages (its full ones
        were put in the prefix cache when its request ended), last page first so that the prefix cache reuses its
        tail before its head (a resume keeps the longest cached prefix), and marks it evicted. False when none is
        left."""
        while self._held:
            held = self._held.pop(next(iter(self._held)))
            pages, held.pages = held.pages, None
            if pages is not None:               # None: released by `release_soon` meanwhile
                held.evicted = True
                self.pool.release(pages[::-1])
                self._held_evictions += 1
                return True
        return False

    def _allocate(self, n: int) -> list[int] | None:
        """n fresh pages, evicting held sequences (least recently held first) while the pool has too few; None (and
        nothing taken) when it has too few with none held."""
        while (pages := self.pool.allocate(n)) is None and self._evict_held():
            pass
        return pages

    def run_to_completion(self, streams, on_step=None) -> None:
        """Runs engine steps on the caller's thread until every stream in `streams` has finished (for an engine
        without the background thread: `start` not called). Each iteration is one `_step`, the step the background
        loop runs, so every request in the engine advances, not only these; `on_step()` is called after each step.
        Callers on several threads take turns (each step runs on one thread at a time).

        If anything raises (on_step included), the unfinished streams are cancelled (their slots and pages freed)
        and the error propagates; if the page pool was lost with it (donated to a step that failed), the engine is
        marked failed (`submit` then raises EngineError). Raises EngineError when no step can make progress
        (waiting requests need more pages than the pool can free).
        """
        if self._thread is not None:
            raise GenerationError("the engine runs its own step loop (start()); iterate the streams instead")
        try:
            with self._driving:
                while not all(stream.finished for stream in streams):
                    if not self._step():
                        raise EngineError(f"the engine cannot admit its waiting requests: they need more KV pages "
                                          f"than the {self.pool.available()} free ones")
                    if on_step is not None:
                        on_step()
        except BaseException as error:
            for stream in streams:
                stream.cancel()
            if any(page.is_deleted() for page in jax.tree.leaves(self.pages)):
                with self._lock:
                    self._error = error
            raise

    def _prompt_targets(self, req: _Running, chunk: int, size: int) -> np.ndarray:
        """The token after each position of `req`'s next prefill chunk ([1, size]; 0 past the prompt's last token and
        in the padding), for a request that scores its prompt."""
        targets = np.zeros((1, size), np.int32)
        after = req.prompt[req.fed + 1:req.fed + chunk + 1]
        targets[0, :len(after)] = after
        return targets

    def _score_prompt(self, req: _Running, start: int, chunk: int, outs) -> None:
        """Records a fetched prefill chunk's prompt logprobs (`position_logprobs`: position start + t predicts
        prompt token start + t + 1) in the request's stream; the chunk that ends the prompt ends the scoring, so a
        recompute after a preemption in decode does not score again (a preemption in prefill scores the same
        positions again, writing the same entries)."""
        token_logp, top_ids, top_logp = outs
        k, events = req.prompt_top_k, req.stream.prompt_logprobs
        for t in range(min(chunk, len(events) - 1 - start)):
            top = [(int(i), float(v)) for i, v in zip(top_ids[t, :k], top_logp[t, :k])]
            events[start + t + 1] = TokenEvent(req.prompt[start + t + 1], float(token_logp[t]), top)
        if start + chunk == len(req.prompt):
            req.scoring = False

    def serves(self, params) -> bool:
        """Whether this engine was built from `params` (the same arrays). An engine on the per-layer layout keeps
        only weak references to the model's stacked layer weights (`params["layers"]` is None: the model holds them,
        or nothing does and they are freed)."""
        def same(a, b):
            return len(a) == len(b) and all(x is y for x, y in zip(a, b))

        if self._layer_refs is None:
            return same(jax.tree.leaves(self.params), jax.tree.leaves(params))
        return (same(jax.tree.leaves(self.params), jax.tree.leaves(dict(params, layers=None)))
                and same([r() for r in self._layer_refs], jax.tree.leaves(params["layers"])))

    def stats(self) -> dict:
        """Counters for monitoring: queue_length, running, pages_in_use, pages_total, prefix_cache_hits (pages
        taken from the prefix cache), preemptions (running requests sent back to the queue for lack of pages),
        held_evictions (`HeldSequence`s evicted for lack of pages), tokens_generated, prefill_tokens (positions
        prefilled for the first time), recomputed_tokens (positions a preempted request prefilled again) and steps
        (engine steps dispatched; cumulative), max_batch."""
        with self._lock:
            self._free_dropped_held()
            return {
                "queue_length": len(self._waiting),
                "running": sum(r is not None for r in self._slots),
                "max_batch": self.max_batch,
                "pages_in_use": self.pool.pages_in_use,
                "pages_total": self.pool.pages_total,
                "pages_cached": self.pool.pages_cached,
                "prefix_cache_hits": self._prefix_cache_hits,
                "preemptions": self._preemptions,
                "held_evictions": self._held_evictions,
                "prefill_tokens": self._prefill_tokens,
                "recomputed_tokens": self._recomputed_tokens,
                "tokens_generated": self._tokens_generated,
                "steps": self._steps,
            }

    # -- validation --
    def _check_context(self, prompt_len: int, extra: int) -> None:
        if prompt_len + extra > self.max_context:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens; with room for {extra} new token(s) that exceeds the engine's "
                f"max_context of {self.max_context} tokens; shorten the prompt")

    def _check_top_k(self, k, name: str = "logprobs") -> None:
        check_integer(k, name, GenerationError, minimum=0)
        if not 0 <= k <= self.top_k:
            raise GenerationError(f"{name} must be in [0, {self.top_k}], got {k}")

    def _validate(self, request: GenerationRequest) -> _Running:
        if not isinstance(request, GenerationRequest):
            raise GenerationError(f"submit takes a GenerationRequest, got {type(request).__name__}")
        r = request
        prompt = validate_prompts([r.prompt_ids], self.config)[0]
        least = 0 if r.prompt_logprobs is not None else 1    # scoring the prompt alone generates nothing
        check_integer(r.max_new_tokens, "max_new_tokens", GenerationError, minimum=least)
        validate_sampling(max(int(r.max_new_tokens), 1), r.temperature, r.top_k, r.top_p)
        if r.top_p is None:
            raise GenerationError("top_p must be in (0, 1], got None")
        self._check_context(len(prompt), min(1, r.max_new_tokens))
        for name, k in (("logprobs", r.logprobs), ("prompt_logprobs", r.prompt_logprobs)):
            if k is not None:
                self._check_top_k(k, name)
        if r.seed is not None and not is_integer(r.seed):
            raise GenerationError(f"seed must be an integer or None, got {r.seed!r}")
        if isinstance(r.stop_token_ids, (str, bytes)) or not all(is_integer(t) for t in r.stop_token_ids):
            raise GenerationError(f"stop_token_ids must be integer token ids, got {r.stop_token_ids!r}")
        budget = min(int(r.max_new_tokens), self.max_context - len(prompt))
        needed = -(-(len(prompt) + max(budget, 1) - 1) // self.page_size)
        if needed > self.pool.pages_total:
            raise GenerationError(
                f"the request needs {needed} KV pages ({len(prompt)} prompt + {budget} new tokens) but the cache "
                f"holds {self.pool.pages_total}; lower max_tokens or give the engine more kv_cache_bytes")
        if r.key is not None:
            key = np.asarray(r.key)
            if key.dtype != np.uint32 or key.shape != _key_data_shape():
                raise GenerationError(f"key must be the uint32 key data of one PRNG key, shape {_key_data_shape()}, "
                                      f"got {key.dtype} {key.shape}")
        else:
            seed = int.from_bytes(os.urandom(4), "little") if r.seed is None else int(r.seed) % 2**32
            key = np.asarray(jax.random.key_data(jax.random.key(np.uint32(seed))))
        top_k = 0 if r.top_k is None else int(r.top_k)
        if top_k < 0:
            raise GenerationError(f"top_k must be >= 0 or None, got {r.top_k}")
        req = _Running(RequestStream(self, len(prompt)), prompt, budget, key, float(r.temperature), top_k,
                       float(r.top_p), frozenset(int(t) for t in r.stop_token_ids), r.logprobs,
                       next(self._order))
        if r.prompt_logprobs is not None:
            req.prompt_top_k, req.scoring = int(r.prompt_logprobs), True
            req.stream.prompt_logprobs = [None] * len(prompt)
        return req

    # -- bookkeeping (under the lock) --
    def _cancel(self, stream: RequestStream) -> None:
        with self._lock:
            for req in list(self._waiting) + [r for r in self._slots if r is not None]:
                if req.stream is stream:
                    self._end(req, "cancelled")
                    self._wake.notify_all()
                    return

    def _end(self, req: _Running, reason: str) -> None:
        """Finishes a request: its full written pages go to the prefix cache, its pages and slot are freed (or held:
        `submit(hold=True)`)."""
        if req.resume is not None:              # ended before admission: its held pages are freed
            self.pool.release(self._unhold(req.resume) or [])
            req.resume = None
        if req.pages is not None:
            self._register_pages(req)
            if req.hold and reason != "cancelled":
                written = -(-req.kv_len // self.page_size)
                self.pool.release(req.pages[written:])
                req.stream.held = self._new_held((req.prompt + req.generated_ids)[:req.kv_len], req.pages[:written])
            else:
                self.pool.release(req.pages)
            req.pages = None
        if req.slot >= 0 and self._slots[req.slot] is req:
            self._slots[req.slot] = None
        elif req in self._waiting:
            self._waiting.remove(req)
        req.stream._finish(reason)

    def _register_pages(self, req: _Running) -> None:
        full = min(req.kv_len // self.page_size, len(req.pages))
        if full <= req.registered:
            return
        tokens = req.prompt + req.generated_ids
        for i, digest in enumerate(page_digests(tokens, self.page_size, full)[req.registered:], req.registered):
            self.pool.register(req.pages[i], digest)
        req.registered = max(req.registered, full)

    def _resumed_pages(self, req: _Running) -> tuple[list[int], int]:
        """(pages kept, tokens they hold) of a resumed request: those of the longest common prefix of the held
        tokens and its prompt but the last token; the held pages past them are freed. A page it will write into
        (the prefix ends inside it) leaves the prefix cache, or, when another request shares it, is not kept."""
        held, req.resume = req.resume, None
        held_pages = self._unhold(held)
        keep = 0
        for old, new in zip(held.tokens, req.prompt[:-1]):
            if old != new:
                break
            keep += 1
        kept = held_pages[:-(-keep // self.page_size)]
        self.pool.release(held_pages[len(kept):])
        if keep % self.page_size and self.pool.refcount[kept[-1]] > 1:
            self.pool.release(kept[-1:])
            kept, keep = kept[:-1], len(kept[:-1]) * self.page_size
        elif keep % self.page_size:
            self.pool.unregister(kept[-1])
        return kept, keep

    def _admit(self) -> None:
        """Admits waiting requests, first come first served, into free slots while the pool has pages for the part of
        their prompt the prefix cache (or their held pages) does not hold, evicting held sequences when short; the
        head of the queue waits otherwise (a resumed one keeps its pages as an evictable HeldSequence meanwhile)."""
        self._free_dropped_held()
        while self._waiting and None in self._slots:
            req = self._waiting[0]
            from_cache = 0
            if req.resume is not None and req.resume.evicted:
                self._unhold(req.resume)
                req.resume = None
            resumed = req.resume is not None
            if resumed:
                shared, cached = self._resumed_pages(req)
            else:
                cacheable = (len(req.prompt) - 1) // self.page_size    # keep >= 1 prompt token to prefill
                if req.scoring:                 # every prompt position's logits are needed: prefill them all
                    cacheable = 0
                shared = self.pool.match_prefix(page_digests(req.prompt, self.page_size, cacheable))
                cached, from_cache = len(shared) * self.page_size, len(shared)
            needed = -(-len(req.prompt) // self.page_size) - len(shared)
            fresh = self._allocate(needed)
            if fresh is None:
                if resumed:                     # its kept pages are held (evictable) while it waits
                    req.resume = self._new_held(req.prompt[:cached], shared)
                else:
                    self.pool.release(shared)
                return                          # wait for pages to be freed
            self._waiting.popleft()
            req.slot = self._slots.index(None)
            self._slots[req.slot] = req
            req.pages = shared + fresh
            req.kv_len = req.fed = cached
            req.registered = cached // self.page_size
            if not req.preempted:             # a re-admitted request's cache hits are its own tokens
                req.stream.cached_tokens = cached
            self._prefix_cache_hits += from_cache

    def _decodes_next(self, req: _Running | None) -> bool:
        """Whether a slot's request runs a decode row in the next step (its prompt is fed, its budget not spent)."""
        return req is not None and not req.stream.finished and len(req.prompt) <= req.fed and req.sampled < req.budget

    def _grow_pages(self) -> None:
        """Gives each request that decodes in the next step the page its next position (`fed`) falls in when it has
        none yet, oldest request first; while the pool has no page, preempts the running request submitted last
        (`_preempt`, possibly the one that needs the page), after evicting every `HeldSequence` (`_allocate`). The
        oldest running request thus always gets its page: alone it fits the pool (`_validate`)."""
        for req in sorted((r for r in self._slots if self._decodes_next(r)), key=lambda r: r.order):
            while req.slot >= 0 and len(req.pages) <= req.fed // self.page_size:
                page = self._allocate(1)
                if page is not None:
                    req.pages += page
                else:
                    self._preempt(max((r for r in self._slots if r is not None), key=lambda r: r.order))

    def _preempt(self, req: _Running) -> None:
        """Frees a running request's slot and pages (its full written pages go to the prefix cache first) and puts it
        back at the head of the queue to recompute: its prompt becomes prompt + the tokens it streamed, its sampling
        continues at step `generated` (`_plan` samples the first token after a prefill at step `sampled`), and the
        results of its steps in flight are dropped when fetched (`_current`)."""
        self._register_pages(req)
        req.written_before = max(req.written_before, req.kv_len)
        self.pool.release(req.pages)
        self._slots[req.slot] = None
        req.pages, req.slot, req.source = None, -1, None
        req.prompt, req.generated_ids = req.prompt + req.generated_ids, []
        req.kv_len = req.fed = req.registered = 0
        req.sampled = req.generated
        req.dropped_through = self._pending.step_id if self._pending is not None else -1
        req.preempted += 1
        self._preemptions += 1
        self._waiting.appendleft(req)

    def _count_prefill(self, req: _Running, chunk: int) -> None:
        """Counts a fetched prefill chunk (positions kv_len .. kv_len + chunk): the positions a preempted request had
        written before (`written_before`) as recomputed_tokens, the others as prefill_tokens."""
        again = max(0, min(req.kv_len + chunk, req.written_before) - req.kv_len)
        self._recomputed_tokens += again
        self._prefill_tokens += chunk - again

    def _current(self, req: _Running, step: _Pending) -> bool:
        """Whether a fetched step's result for `req` still counts: the request has not ended, and the step was not
        dispatched before it was preempted."""
        return not req.stream.finished and step.step_id > req.dropped_through

    def _emit(self, req: _Running, token: int, logp, top_ids, top_logp) -> None:
        if req.stream.finished:
            return
        req.last_token = token
        req.generated += 1
        req.generated_ids.append(token)
        self._tokens_generated += 1
        event = TokenEvent(token, None, None)
        if req.logprobs is not None:
            k = req.logprobs
            event = TokenEvent(token, float(logp), [(int(i), float(v)) for i, v in zip(top_ids[:k], top_logp[:k])])
        req.stream._push(event)
        if token in req.stops:
            self._end(req, "stop")
        elif req.generated >= req.budget:
            self._end(req, "length")

    # -- the step loop --
    def _table(self, req: _Running | None, width: int) -> np.ndarray:
        row = np.full((width,), NULL_PAGE, np.int32)
        if req is not None and req.pages:
            pages = req.pages[:width]
            row[:len(pages)] = pages
        return row

    def _max_prefill_chunk(self, value) -> int:
        """max_prefill_chunk as the engine takes it: default IDLE_CHUNK_FACTOR x prefill_chunk, at least
        prefill_chunk, capped at max_context."""
        if value is None:
            value = IDLE_CHUNK_FACTOR * self.prefill_chunk
        check_integer(value, "max_prefill_chunk", GenerationError)
        if value < self.prefill_chunk:
            raise GenerationError(f"max_prefill_chunk must be >= prefill_chunk ({self.prefill_chunk}), got {value}")
        return min(int(value), self.max_context)

    def _chunk_buckets(self) -> list[int]:
        """The prefill chunk lengths a step may take (a chunk is padded to the smallest that holds it): powers of
        two from MIN_CHUNK_BUCKET, prefill_chunk and max_prefill_chunk."""
        sizes, size = {self.prefill_chunk, self.max_prefill_chunk}, MIN_CHUNK_BUCKET
        while size < self.max_prefill_chunk:
            sizes.add(size)
            size *= 2
        return sorted(sizes)

    def row_buckets(self) -> list[int]:
        """The decode step's row counts: powers of two below max_batch, and max_batch. A step's decoding requests
        take the first rows of the smallest bucket that holds them (`_decode_rows`), so one request runs a
        one-row program, not max_batch rows."""
        rows, n = [], 1
        while n < self.max_batch:
            rows.append(n)
            n *= 2
        return rows + [self.max_batch]

    def _decode_rows(self, decoding) -> list:
        """The decode step's rows for the decoding requests among `decoding` (one entry per slot, None where the
        slot does not decode): those requests in slot order, then idle rows (None) up to the smallest row bucket
        that holds them; [] when none decodes. A request's row may change from step to step: its keys/values
        live in the shared page pool, found through its block table, and its sampling key and step go with it."""
        active = [r for r in decoding if r is not None]
        if not active:
            return []
        rows = next(n for n in self.row_buckets() if n >= len(active))
        return active + [None] * (rows - len(active))

    def table_widths(self) -> list[int]:
        """The block-table widths (pages) a step may take: powers of two from MIN_TABLE_TOKENS' worth of pages,
        and the full width (max_context / page_size). A step takes the narrowest that covers its rows' positions,
        so attention reads the pages in use (rounded up), not max_context's."""
        widths, width = [], max(1, -(-MIN_TABLE_TOKENS // self.page_size))
        while width < self.table_width:
            widths.append(width)
            width *= 2
        return widths + [self.table_width]

    def _width(self, positions: int) -> int:
        """The narrowest table width whose pages hold `positions` positions."""
        pages = -(-positions // self.page_size)
        return next(w for w in self.table_widths() if w >= pages)

    def program_shapes(self) -> list[tuple[int, int, int]]:
        """(rows, new tokens, table width) of every program `warmup` compiles: the decode step [rows, 1] for each
        row bucket (`row_buckets`) at each table width, and each prefill-chunk bucket [1, size] (`_chunk_buckets`)
        at each width that holds the chunk. So len(row_buckets) x len(table_widths) decode programs and at most
        len(_chunk_buckets) x len(table_widths) prefill programs: for max_batch 8, max_context 16384 and pages of
        16 tokens (prefill_chunk 128, max_prefill_chunk 256), 4 x 7 + 5 x 7 = 63 (35 before row buckets and the
        idle chunk); 77 for max_batch 32."""
        decode = [(rows, 1, w) for rows in self.row_buckets() for w in self.table_widths()]
        prefill = [(1, size, w) for size in self._chunk_buckets() for w in self.table_widths()
                   if w >= self._width(size)]
        return decode + prefill

    def _dispatch(self, rows, tokens, feed, carry, start, n_new, steps, width):
        """Dispatches one `engine_step` over rows (None: an idle row) with block tables `width` pages wide;
        returns its device outputs (tokens [max_batch], logprob, top-k ids, top-k logprobs), and for the prefill
        chunk of a request that scores its prompt (`_Running.scoring`; dispatched before its `fed` advances) the
        chunk's prompt logprobs (`position_logprobs`). Every program with more than one new token per row (the
        prefill chunks) carries the prompt-logprobs output, computed only for such a chunk, so scoring compiles
        nothing of its own."""
        args, kwargs = self._step_args(rows, tokens, feed, carry, start, n_new, steps, width)
        self.pages, *outs = engine_step(*args, **kwargs)
        return outs if kwargs.get("want_prompt_logprobs", False) else outs[:4]

    def _step_args(self, rows, tokens, feed, carry, start, n_new, steps, width) -> tuple[tuple, dict]:
        """The (args, kwargs) of `_dispatch`'s `engine_step` call (also what `warmup` compiles it for)."""
        tables = np.stack([self._table(r, width) for r in rows])
        keys = np.stack([r.key if r is not None else np.zeros(_key_data_shape(), np.uint32) for r in rows])
        temp = np.array([r.temperature if r is not None else 0.0 for r in rows], np.float32)
        top_k = np.array([r.top_k if r is not None else 0 for r in rows], np.int32)
        top_p = np.array([r.top_p if r is not None else 1.0 for r in rows], np.float32)
        want_logprobs = np.bool_(any(r is not None and r.logprobs is not None for r in rows))
        prompt, targets = {}, None
        if len(rows) == 1 and rows[0] is not None and rows[0].scoring and rows[0].fed < len(rows[0].prompt):
            targets = self._prompt_targets(rows[0], int(n_new[0]), tokens.shape[1])
        if tokens.shape[1] > 1 or targets is not None:
            prompt = dict(targets=np.zeros_like(tokens) if targets is None else targets,
                          want_prompt_logprobs=np.bool_(targets is not None))
        return ((self.step_params, self.pages, tokens, feed, *carry, start, n_new, tables, keys, steps, temp, top_k,
                 top_p, want_logprobs), dict(prompt, config=self.config, top_k=self.top_k, shard=self.shard))

    def warmup(self, progress: bool = False, workers: int | None = None) -> None:
        """Compiles every program `program_shapes` lists ahead of time, without running them (`compile_ahead`:
        lowered here, compiled concurrently on `workers` threads, default `compile_ahead.default_workers`; a tqdm
        bar with `progress`), with the arguments `_dispatch` passes (a prefill program's prompt-logprobs inputs
        included), so the steps that follow compile nothing; and the seed -> key conversion of a seeded request."""
        if self._warm:
            return
        jax.block_until_ready(jax.random.key_data(jax.random.key(np.uint32(0))))
        carry, calls = self._carry(None, None), []
        for rows, size, width in self.program_shapes():
            zeros = np.zeros(rows, np.int32)
            calls.append(self._step_args([None] * rows, np.zeros((rows, size), np.int32), zeros - 1, carry, zeros,
                                         zeros, zeros, width))
        compile_ahead(engine_step, calls, workers=workers, progress=progress, desc="compiling engine programs")
        self._warm = True

    def _plan(self) -> _Pending | None:
        """Under the lock: gives decoding requests their next page (`_grow_pages`, preempting when short), admits
        waiting requests and dispatches the next step (at most one prefill chunk, longer
        when nothing decodes, and one decode step over the decoding requests in the smallest row bucket that holds
        them: `_decode_rows`), advancing the requests' dispatched counters. A slot whose previous
        token is still on the device (the step before, not fetched yet) is fed from there. None: nothing to do."""
        self._grow_pages()
        self._admit()
        running = [r for r in self._slots if r is not None and not r.stream.finished]
        prefilling = sorted((r for r in running if r.fed < len(r.prompt)), key=lambda r: r.order)
        decoding = [r if self._decodes_next(r) else None for r in self._slots]
        prefill = prefilling[0] if prefilling else None
        if prefill is None and all(r is None for r in decoding):
            return None
        pending, step_id = self._pending, self._steps
        self._steps += 1
        carry = pending.carry if pending is not None else self._carry(None, None)

        def feed_from(req: _Running) -> int:
            if pending is not None and req.source is not None and req.source[0] == pending.step_id:
                return req.source[1]
            return -1

        p_out = chunk = None
        rows = self._decode_rows(decoding)
        if prefill is not None:
            chunk = min(self.prefill_chunk if rows else self.max_prefill_chunk, len(prefill.prompt) - prefill.fed)
            size = next(s for s in self._chunk_buckets() if s >= chunk)
            p_tokens = np.zeros((1, size), np.int32)
            p_tokens[0, :chunk] = prefill.prompt[prefill.fed:prefill.fed + chunk]
            start = np.array([prefill.fed], np.int32)
            p_out = self._dispatch([prefill], p_tokens, np.full(1, -1, np.int32), carry, start,
                                   np.array([chunk], np.int32), np.array([prefill.sampled], np.int32),
                                   self._width(max(prefill.fed + chunk, size)))
            prefill.fed += chunk
            if prefill.fed == len(prefill.prompt):
                prefill.sampled, prefill.source = prefill.sampled + 1, (step_id, self.max_batch)
        d_out = None
        if rows:
            active = [r for r in rows if r is not None]
            d_tokens = np.array([[r.last_token if r is not None else 0] for r in rows], np.int32)
            feed = np.array([feed_from(r) if r is not None else -1 for r in rows], np.int32)
            start = np.array([r.fed if r is not None else 0 for r in rows], np.int32)
            n_new = np.array([r is not None for r in rows], np.int32)
            steps = np.array([r.sampled if r is not None else 0 for r in rows], np.int32)
            d_out = self._dispatch(rows, d_tokens, feed, carry, start, n_new, steps,
                                   self._width(max(r.fed for r in active) + 1))
            for b, r in enumerate(active):
                r.fed, r.sampled, r.source = r.fed + 1, r.sampled + 1, (step_id, b)
        return _Pending(step_id, prefill, chunk, rows, p_out, d_out, self._carry(p_out, d_out))

    def _carry(self, p_out, d_out) -> tuple:
        """A step's sampled tokens as the next step reads them (decode rows, prefill row: each [max_batch], padded
        by `engine_step`, so every program takes fed tokens of one shape); zeros for a program the step did not
        run."""
        return (d_out[0] if d_out is not None else self._zero_carry[0],
                p_out[0] if p_out is not None else self._zero_carry[1])

    def _process(self, step: _Pending) -> None:
        """Fetches a dispatched step's tokens (one transfer) and emits them. A request that ended meanwhile (a stop
        token in the step before, a cancel, a preemption: `_current`) has its token dropped: its extra step wrote only
        into its own pages, past the positions the prefix cache holds, and its pages were freed after that step was
        queued."""
        p_out, d_out = jax.device_get((step.p_out, step.d_out))
        with self._lock:
            prefill = step.prefill
            if prefill is not None and self._current(prefill, step):
                self._count_prefill(prefill, step.chunk)
                if len(p_out) > 4:
                    self._score_prompt(prefill, prefill.kv_len, step.chunk, p_out[4:])
                prefill.kv_len += step.chunk
                self._register_pages(prefill)
                if prefill.kv_len == len(prefill.prompt) and prefill.budget == 0:
                    self._end(prefill, "length")         # scored its prompt; generates nothing
                elif prefill.kv_len == len(prefill.prompt):
                    self._emit(prefill, int(p_out[0][0]), p_out[1][0], p_out[2][0], p_out[3][0])
            if d_out is not None:
                for b, req in enumerate(step.decoding):
                    if req is not None and self._current(req, step):
                        req.kv_len += 1
                        self._emit(req, int(d_out[0][b]), d_out[1][b], d_out[2][b], d_out[3][b])

    def _step(self) -> bool:
        """One engine step: dispatches the next step, then fetches and emits the previous one's tokens, so the
        device computes step k+1 while the host streams step k's (no host round trip per token); False when there
        was nothing to do."""
        with self._lock:
            step = self._plan()
        previous, self._pending = self._pending, step
        if previous is not None:
            self._process(previous)
        return step is not None or previous is not None

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while (not self._stopping and not self._waiting and self._pending is None
                           and all(r is None for r in self._slots)):
                        self._wake.wait()
                    if self._stopping:
                        return
                if not self._step():
                    with self._lock:         # waiting requests but no pages free: sleep until something ends
                        if not self._stopping:
                            self._wake.wait(timeout=0.05)
        except BaseException as error:      # noqa: BLE001 - every stream must learn that the engine died
            with self._lock:
                self._error = error
                for req in list(self._waiting) + [r for r in self._slots if r is not None]:
                    req.stream._finish(None, error)
                    if req.pages is not None:
                        self.pool.release(req.pages)
                        req.pages = None
                self._waiting.clear()
                self._slots = [None] * self.max_batch
