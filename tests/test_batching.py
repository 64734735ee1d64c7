"""The serving engine (phi4_jax.inference.batching): continuous batching against transformers' greedy generate (the
peer) and `phi4_jax.generate`; cancellation, prefix caching, queue limits, logprobs against transformers' logits,
no recompilation after warm-up, and a mesh. (`kernels.paged_attention` itself: tests/test_paged_attention.py.)

One tiny random Phi3ForCausalLM is saved by transformers and converted with the real `convert_weights.py` CLI; one
started engine (module-scoped) serves every test that generates, so its programs compile once.
"""

import asyncio
import gc
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_events import recorded_compiles
from hf_models import convert_tiny_phi3, hf_logits

import phi4_jax
from phi4_jax.inference.batching import ContinuousBatchingEngine, GenerationRequest
from phi4_jax.inference.errors import ContextLengthError, GenerationError, QueueFullError

PAGE = 16
MAX_BATCH = 3
MAX_CONTEXT = 512
CHUNK = 64
IDLE_CHUNK = 128      # max_prefill_chunk: the chunk while nothing decodes
NEW = 20


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    dst, hf_model = convert_tiny_phi3(root, seed=5, hidden=96)   # head_dim 16: the native CPU paged attention
    return phi4_jax.load_model(dst, dtype=jnp.float32), hf_model


@pytest.fixture(scope="module")
def engine(converted):
    eng = ContinuousBatchingEngine(converted[0], max_batch=MAX_BATCH, max_context=MAX_CONTEXT, page_size=PAGE,
                                   prefill_chunk=CHUNK, max_prefill_chunk=IDLE_CHUNK)
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(3, 311, n).tolist() for n in (3, 29, 300, 70, 45)]   # 300: 3-5 prefill chunks


@pytest.fixture(scope="module")
def references(converted, prompts):
    """Each prompt's greedy answer from `phi4_jax.generate` alone (its single-request answer)."""
    return [phi4_jax.generate(converted[0], [p], max_new_tokens=NEW, stop_tokens=[])[0] for p in prompts]


def run(engine, request):
    stream = engine.submit(request)
    tokens = [event.token_id for event in stream]
    return tokens, stream


def hf_greedy(hf_model, prompt, n):
    import torch

    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def wait_until(predicate, timeout=60.0):
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return False


# ----------------------------------------------------------------------------- generation

def test_concurrent_greedy_equals_transformers_and_generate(engine, converted, prompts, references):
    """More requests than slots, all at once: each equals transformers' greedy generate and its single-request
    `phi4_jax.generate` answer."""
    _, hf_model = converted
    streams = [engine.submit(GenerationRequest(p, NEW)) for p in prompts]
    outputs = [[e.token_id for e in s] for s in streams]
    for prompt, ours, ref, stream in zip(prompts, outputs, references, streams):
        assert ours == ref, f"prompt of {len(prompt)} tokens differs from generate"
        assert stream.finish_reason == "length" and stream.completion_tokens == NEW
        assert stream.prompt_tokens == len(prompt)
    for i in (0, 2):   # the shortest prompt and the one prefilled in five chunks
        assert outputs[i] == hf_greedy(hf_model, prompts[i], NEW)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["queue_length"] == 0 and stats["pages_in_use"] == 0


def test_staggered_arrivals_and_sampling_each_equal_single_request(engine, converted, prompts, references):
    """Requests arrive while others are mid-stream (some sampled with their own seed, temperature and top_p, one
    stopping at a token): each equals its single-request answer."""
    model = converted[0]
    sampled = dict(temperature=0.9, top_p=0.8)
    want_sampled = phi4_jax.generate(model, [prompts[1]], max_new_tokens=NEW, seed=[123], stop_tokens=[],
                                     **sampled)[0]
    stop = references[3][6]
    first = engine.submit(GenerationRequest(prompts[2], NEW))
    got_first = [next(first).token_id]        # running when the others arrive
    second = engine.submit(GenerationRequest(prompts[1], NEW, seed=123, **sampled))
    got_first.append(next(first).token_id)
    third = engine.submit(GenerationRequest(prompts[3], NEW, stop_token_ids=(stop,)))
    fourth = engine.submit(GenerationRequest(prompts[0], NEW))
    got_first += [e.token_id for e in first]
    assert got_first == references[2]
    assert [e.token_id for e in second] == want_sampled
    stopped = [e.token_id for e in third]
    assert stopped == references[3][:references[3].index(stop) + 1] and third.finish_reason == "stop"
    assert [e.token_id for e in fourth] == references[0]


def test_async_iteration(engine, prompts, references):
    async def consume():
        streams = [engine.submit(GenerationRequest(p, NEW)) for p in prompts[:2]]

        async def one(s):
            return [e.token_id async for e in s]
        return await asyncio.gather(*(one(s) for s in streams))

    assert asyncio.run(consume()) == references[:2]


def test_cancel_frees_slot_and_pages_at_once(engine, prompts, references):
    before = engine.stats()
    long = engine.submit(GenerationRequest(prompts[4], 400))
    other = engine.submit(GenerationRequest(prompts[1], NEW))
    for _ in range(3):
        next(long)
    with engine._lock:              # pages come on demand: exactly those of the positions its dispatched steps write
        req = next(r for r in engine._slots if r is not None and r.stream is long)
        assert len(req.pages) == -(-req.fed // PAGE) < -(-(len(prompts[4]) + 399) // PAGE)
        own = [p for p in req.pages if engine.pool.refcount[p] == 1]
    long.cancel()
    with engine._lock:              # no engine step in between: the cancel itself freed them
        assert own and all(engine.pool.refcount[p] == 0 for p in own)
    assert long.finish_reason == "cancelled"
    assert list(long) == []          # the stream ends at once
    assert [e.token_id for e in other] == references[1]
    assert wait_until(lambda: engine.stats()["running"] == 0)
    assert engine.stats()["pages_in_use"] == before["pages_in_use"] == 0


def test_prefix_cache_skips_shared_pages(engine, converted, prompts):
    """A shared system prompt and a chat's earlier turn are taken from the prefix cache (counted in stats, not
    prefilled again), and the answers are those of a full prefill (`generate`)."""
    model = converted[0]
    rng = np.random.default_rng(3)
    system = rng.integers(3, 311, 5 * PAGE + 3).tolist()
    turn1 = system + rng.integers(3, 311, 10).tolist()
    stats0 = engine.stats()
    answer1, _ = run(engine, GenerationRequest(turn1, NEW))
    stats1 = engine.stats()
    assert answer1 == phi4_jax.generate(model, [turn1], max_new_tokens=NEW, stop_tokens=[])[0]

    other = system + rng.integers(3, 311, 7).tolist()         # same system prompt, another user
    answer_other, _ = run(engine, GenerationRequest(other, NEW))
    stats2 = engine.stats()
    assert stats2["prefix_cache_hits"] - stats1["prefix_cache_hits"] == 5
    assert stats2["prefill_tokens"] - stats1["prefill_tokens"] == len(other) - 5 * PAGE
    assert answer_other == phi4_jax.generate(model, [other], max_new_tokens=NEW, stop_tokens=[])[0]

    turn2 = turn1 + answer1 + rng.integers(3, 311, 9).tolist()  # the next turn of the first chat
    answer2, _ = run(engine, GenerationRequest(turn2, NEW))
    stats3 = engine.stats()
    cached = (len(turn1) + NEW - 1) // PAGE                      # pages of turn 1 and its answer, all written
    assert stats3["prefix_cache_hits"] - stats2["prefix_cache_hits"] == cached
    assert stats3["prefill_tokens"] - stats2["prefill_tokens"] == len(turn2) - cached * PAGE
    assert answer2 == phi4_jax.generate(model, [turn2], max_new_tokens=NEW, stop_tokens=[])[0]
    assert stats1["prefill_tokens"] - stats0["prefill_tokens"] == len(turn1)


def test_logprobs_match_transformers(engine, converted, prompts):
    """Each new token's logprob and top-k alternatives, and a request's `prompt_logprobs` (max_new_tokens 0: the
    prompt scored, nothing generated), are log_softmax of transformers' logits at that position."""
    _, hf_model = converted
    prompt = prompts[1]
    events = list(engine.submit(GenerationRequest(prompt, 6, logprobs=3)))
    seq = prompt + [e.token_id for e in events]
    logp = jax.nn.log_softmax(jnp.asarray(hf_logits(hf_model, [seq])[0]), axis=-1)
    logp = np.asarray(logp)
    for j, event in enumerate(events):
        row = logp[len(prompt) - 1 + j]
        assert event.token_id == int(np.argmax(row))
        np.testing.assert_allclose(event.logprob, row[event.token_id], atol=1e-4)
        ids = [i for i, _ in event.top_logprobs]
        assert ids == np.argsort(-row)[:3].tolist()
        np.testing.assert_allclose([v for _, v in event.top_logprobs], row[ids], atol=1e-4)
    scored = engine.submit(GenerationRequest(seq, 0, prompt_logprobs=2))
    assert list(scored) == [] and scored.finish_reason == "length"
    echo = scored.prompt_logprobs
    assert echo[0] is None and len(echo) == len(seq)
    for s in range(1, len(seq)):
        assert echo[s].token_id == seq[s]
        np.testing.assert_allclose(echo[s].logprob, logp[s - 1, seq[s]], atol=1e-4)
        assert [i for i, _ in echo[s].top_logprobs] == np.argsort(-logp[s - 1])[:2].tolist()


def test_prompt_logprobs_run_in_prefill_chunks_beside_decodes(engine, converted, prompts, references, monkeypatch):
    """A request scoring a 300-token prompt (several chunks, CHUNK tokens while another request decodes) gets each
    position's logprob and top-3 ids equal to transformers' log-softmax; its chunks run in the same engine steps as
    the other request's decode rows, whose answer is unchanged; nothing compiles (the prefill programs carry the
    scoring output). It takes no page from the prefix cache, but registers its own: a later generation with the same
    prompt takes them (and answers as transformers does)."""
    _, hf_model = converted
    prompt = np.random.default_rng(31).integers(3, 311, 300).tolist()
    logits = hf_logits(hf_model, [prompt])[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    run(engine, GenerationRequest(prompt[:2 * PAGE + 5], 1))      # two of its pages are in the prefix cache
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    steps, _ = record_steps(engine, monkeypatch)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # Queued together (submitting one after the other would race the engine thread): the short prompt is
        # prefilled in the first step, then it decodes while the 300-token one is prefilled in CHUNK-token chunks.
        decoding, scored = engine.submit_many([GenerationRequest(prompts[3], NEW),
                                               GenerationRequest(prompt, 2, prompt_logprobs=3)])
        new = [e.token_id for e in scored]
        answer = [e.token_id for e in decoding]
        assert scored.cached_tokens == 0                           # scoring needs every position: none from cache
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert answer == references[3] and new == hf_greedy(hf_model, prompt, 2)
    events = scored.prompt_logprobs
    assert len(events) == len(prompt) and events[0] is None
    assert [e.token_id for e in events[1:]] == prompt[1:]
    np.testing.assert_allclose([e.logprob for e in events[1:]], [logp[s - 1, prompt[s]] for s in range(1, 300)],
                               atol=1e-4)
    for s in range(1, 300):
        assert [i for i, _ in events[s].top_logprobs] == np.argsort(-logp[s - 1], kind="stable")[:3].tolist()
        np.testing.assert_allclose([v for _, v in events[s].top_logprobs], np.sort(logp[s - 1])[::-1][:3], atol=1e-4)
    chunks = [(chunk, decoding_rows) for chunk, _, decoding_rows, step in steps
              if step.prefill is not None and step.prefill.stream is scored]
    assert len(chunks) >= 3 and sum(c for c, _ in chunks) == len(prompt)
    assert sum(rows > 0 and c == CHUNK for c, rows in chunks) >= 1     # prefilled beside the other's decode rows

    hits = engine.stats()["prefix_cache_hits"]
    again, _ = run(engine, GenerationRequest(prompt, 2))
    assert engine.stats()["prefix_cache_hits"] - hits == (len(prompt) - 1) // PAGE and again == new


def test_cpu_layout_engine_keeps_no_second_copy_of_the_layer_weights(converted):
    """On the CPU layout the engine runs on its per-layer copy and keeps no reference to the model's stacked layer
    weights: dropping the model frees them (so `python -m phi4_jax.serve` holds one copy of the layers); `serves`
    still tells the engine's own params (by identity) from other arrays, so `generate` reuses its cached engine."""
    from phi4_jax.inference.engine import shared_engine
    from phi4_jax.model.decoder import model_from_params

    model0 = converted[0]
    model = model_from_params(model0.config, jax.tree.map(jnp.copy, model0.params))
    eng = ContinuousBatchingEngine(model, max_batch=1, max_context=64, page_size=PAGE)
    assert eng.per_layer and eng.params["layers"] is None
    assert eng.serves(model.params) and not eng.serves(model0.params)
    assert shared_engine(model, batch=1, context=64) is shared_engine(model, batch=1, context=64)
    stacked = [weakref.ref(w) for w in jax.tree.leaves(model.params["layers"])]
    del model
    gc.collect()
    assert all(ref() is None for ref in stacked)
    assert eng.step_params["layers"] and not eng.serves(model0.params)


def record_steps(engine, monkeypatch) -> list:
    """Records (prefill chunk or None, decode rows, decoding requests) of every step `engine` dispatches from now
    on, and the shape (rows, tokens, table width) of every program it runs."""
    steps, shapes = [], []
    plan, dispatch = engine._plan, engine._dispatch

    def record_plan():
        step = plan()
        if step is not None:
            steps.append((step.chunk, len(step.decoding), sum(r is not None for r in step.decoding), step))
        return step

    def record_dispatch(rows, tokens, *args):
        shapes.append((len(rows), tokens.shape[1], args[-1]))
        return dispatch(rows, tokens, *args)

    monkeypatch.setattr(engine, "_plan", record_plan)
    monkeypatch.setattr(engine, "_dispatch", record_dispatch)
    return steps, shapes


def test_no_recompilation_after_warmup(engine, prompts, monkeypatch):
    """New prompt lengths, budgets, sampling settings, logprobs and prefix hits compile nothing new, and the steps
    ran every decode row bucket (1, 2 and 3 requests decoding), each a shape `program_shapes` lists."""
    steps, shapes = record_steps(engine, monkeypatch)
    with recorded_compiles() as compiles:
        streams = engine.submit_many([GenerationRequest(p[:n], k, temperature=t, top_p=tp, seed=s, logprobs=lp)
                                      for p, n, k, t, tp, s, lp in [(prompts[2], 97, 5, 0.0, 1.0, None, None),
                                                                    (prompts[3], 41, 9, 0.7, 0.5, 1, 2),
                                                                    (prompts[4], 17, 3, 1.3, 1.0, None, 0),
                                                                    (prompts[2], 250, 4, 0.0, 1.0, None, None)]])
        for s in streams:
            assert len(list(s)) > 0
        assert wait_until(lambda: engine._pending is None)
    assert compiles == []
    assert engine.row_buckets() == [1, 2, 3]
    assert {rows for _, rows, _, _ in steps} == {0, 1, 2, 3}
    assert set(shapes) <= set(engine.program_shapes())


def test_cpu_step_attends_with_the_native_kernel(engine):
    """On the CPU the engine's step calls the native paged attention (kernels/cpu_native), one call per layer, so
    the engine tests here run it against transformers; a silent fall-back to the XLA gather would fail this."""
    from kernels import cpu_native
    from phi4_jax.inference.batching import engine_step

    if not cpu_native.available("phi4_cpu_paged_attention"):
        pytest.skip(f"native CPU kernels unavailable: {cpu_native.unavailable_reason()}")
    rows, width = 2, engine.table_width
    key = jax.random.key_data(jax.random.key(0))
    text = engine_step.lower(
        engine.step_params, engine.pages, tokens=jnp.zeros((rows, 1), jnp.int32), feed=jnp.full(rows, -1, jnp.int32),
        prev_decode=jnp.zeros(MAX_BATCH, jnp.int32), prev_prefill=jnp.zeros(1, jnp.int32),
        start=jnp.full(rows, 20, jnp.int32), n_new=jnp.ones(rows, jnp.int32),
        block_tables=jnp.zeros((rows, width), jnp.int32), keys=jnp.zeros((rows,) + key.shape, key.dtype),
        steps=jnp.zeros(rows, jnp.int32), temperature=jnp.zeros(rows, jnp.float32),
        sample_top_k=jnp.zeros(rows, jnp.int32), top_p=jnp.ones(rows, jnp.float32), want_logprobs=False,
        config=engine.config, top_k=engine.top_k, shard=None).as_text()
    assert engine.per_layer and text.count("phi4_cpu_paged_attention") == engine.config.num_layers


def test_decode_program_is_sized_to_the_running_rows(engine, converted, prompts, references, monkeypatch):
    """One request decodes in the one-row program; a step's n decoding requests run the smallest row bucket that
    holds them, in its first rows; prefill chunks are IDLE_CHUNK tokens while nothing decodes, CHUNK while some
    request does. Answers stay the single-request ones."""
    fresh, joining = ([first] + prompts[2][1:] for first in (310, 309))   # 300 tokens, no page in the prefix cache
    want, want_joining = (phi4_jax.generate(converted[0], [p], max_new_tokens=NEW, stop_tokens=[])[0]
                          for p in (fresh, joining))
    steps, shapes = record_steps(engine, monkeypatch)
    with recorded_compiles() as compiles:
        assert run(engine, GenerationRequest(fresh, NEW))[0] == want
        assert wait_until(lambda: engine._pending is None)
        alone = list(steps)
        assert [chunk for chunk, _, _, _ in alone if chunk is not None] == [128, 128, 300 - 256]
        decode_shapes = [s for s in shapes if s[1] == 1]
        assert len(decode_shapes) == NEW - 1 and {rows for rows, _, _ in decode_shapes} == {1}

        steps.clear()
        streams = engine.submit_many([GenerationRequest(p, NEW) for p in (prompts[0], joining, prompts[3], prompts[1])])
        assert [[e.token_id for e in s] for s in streams] == [references[0], want_joining, references[3], references[1]]
        assert wait_until(lambda: engine._pending is None)
    monkeypatch.undo()
    assert compiles == []                                                # no new program
    for chunk, rows, decoding, step in alone + steps:
        assert rows == (next(b for b in engine.row_buckets() if b >= decoding) if decoding else 0)
        assert all(r is not None for r in step.decoding[:decoding])     # the first rows, then idle ones
        assert not any(step.decoding[decoding:])
        if chunk is not None:
            assert chunk <= (CHUNK if decoding else IDLE_CHUNK)
    assert {rows for _, rows, _, _ in steps} >= {1, 2, 3}
    assert any(chunk == CHUNK and decoding for chunk, _, decoding, _ in steps)   # a long prompt joined mid-stream


def test_seeded_sampling_does_not_depend_on_the_row(engine, converted, prompts, references, monkeypatch):
    """A seeded sampled request draws its k-th token with fold_in(key(seed), k) whichever row it sits in: alone,
    and among requests joining and leaving (which move it between rows and row buckets), its tokens are the same,
    and they are that definition applied to transformers' logits (temperature 0.8, no top-k/top-p)."""
    model, hf_model = converted
    seed, temperature = 77, 0.8
    sampled = dict(temperature=temperature, seed=seed)
    alone = [e.token_id for e in engine.submit(GenerationRequest(prompts[3], NEW, **sampled))]
    seq = prompts[3] + alone
    logits = hf_logits(hf_model, [seq])[0, len(prompts[3]) - 1:-1] / temperature
    want = [int(jax.random.categorical(jax.random.fold_in(jax.random.key(seed), k), jnp.asarray(row)))
            for k, row in enumerate(logits)]
    assert alone == want

    steps, _ = record_steps(engine, monkeypatch)
    first = engine.submit(GenerationRequest(prompts[0], 6))                  # leaves early: the others move up
    got_first = [next(first).token_id]
    other, target, late = engine.submit_many([                              # late waits for a slot, joins mid-stream
        GenerationRequest(prompts[1], NEW, temperature=1.1, top_p=0.7, seed=5),
        GenerationRequest(prompts[3], NEW, **sampled), GenerationRequest(prompts[4], 8)])
    got = [e.token_id for e in target]
    assert got_first + [e.token_id for e in first] == references[0][:6]
    assert [e.token_id for e in late] == references[4][:8]
    list(other)
    assert wait_until(lambda: engine._pending is None)
    monkeypatch.undo()
    assert got == alone
    places = {(step.decoding.index(r), rows) for _, rows, _, step in steps for r in step.decoding
              if r is not None and r.stream is target}
    assert len({row for row, _ in places}) >= 2 and len({rows for _, rows in places}) >= 2, places


# ----------------------------------------------------------------------------- limits and bad input

def test_queue_full_context_and_bad_requests(converted):
    """An engine that is not started keeps every request waiting: the queue fills; bad requests are refused."""
    eng = ContinuousBatchingEngine(converted[0], max_batch=2, max_context=64, page_size=8, max_queue=2)
    assert eng.stats()["pages_total"] == 2 * 64 // 8          # no memory report on CPU: max_batch x max_context
    assert eng.prefill_chunk == 64                            # the default chunk (128) capped at the context
    waiting = [eng.submit(GenerationRequest([5, 6, 7], 4)) for _ in range(2)]
    with pytest.raises(QueueFullError, match="max_queue=2"):
        eng.submit(GenerationRequest([5, 6, 7], 4))
    assert eng.stats()["queue_length"] == 2
    with pytest.raises(ContextLengthError, match="max_context of 64"):
        eng.submit(GenerationRequest(list(range(3, 67)), 4))
    for bad, match in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p"),
                       (dict(temperature=-1.0), "temperature"), (dict(logprobs=21), "logprobs"),
                       (dict(prompt_logprobs=21), "prompt_logprobs must be in"),
                       (dict(prompt_logprobs=-1), "prompt_logprobs"),
                       (dict(prompt_ids=[1, 400]), "outside the vocabulary"), (dict(prompt_ids=[]), "empty")]:
        kwargs = {"prompt_ids": [5, 6], "max_new_tokens": 3, **bad}
        with pytest.raises(GenerationError, match=match):
            eng.submit(GenerationRequest(**kwargs))
    waiting[0].cancel()
    assert eng.stats()["queue_length"] == 1 and waiting[0].finish_reason == "cancelled"
    eng.shutdown()
    assert waiting[1].finish_reason == "cancelled" and list(waiting[1]) == []


def test_submit_many_queues_all_or_none(converted):
    """`submit_many` checks every request before queueing any: a bad one, or a queue without room for all of them,
    leaves the queue as it was; more requests than max_queue is a GenerationError (no wait would fix it); an empty
    list queues nothing and raises nothing."""
    eng = ContinuousBatchingEngine(converted[0], max_batch=2, max_context=64, page_size=8, max_queue=3)
    good = GenerationRequest([5, 6, 7], 4)
    with pytest.raises(GenerationError, match="top_p"):
        eng.submit_many([good, GenerationRequest([5, 6], 3, top_p=0.0)])
    assert eng.stats()["queue_length"] == 0
    first = eng.submit_many([good, good])
    with pytest.raises(QueueFullError, match=r"2 requests are waiting \(max_queue=3\) and 2 were submitted together"):
        eng.submit_many([good, good])
    assert eng.stats()["queue_length"] == 2
    with pytest.raises(GenerationError, match="4 requests submitted together exceed the engine's queue"):
        eng.submit_many([good] * 4)
    last = eng.submit_many([good])
    assert eng.stats()["queue_length"] == 3
    eng.shutdown()
    assert all(s.finish_reason == "cancelled" for s in first + last)
    assert eng.submit_many([]) == []                         # nothing to queue: no error even when shut down


def test_engine_on_a_mesh_equals_single_device_generate():
    """On a 4x2 (fsdp x tensor) mesh of simulated CPU devices the page pool is split over kv heads and the
    greedy answers equal single-device `generate`; the sharded programs compiled ahead of time at start are the ones
    the requests run (nothing compiles after start)."""
    from flax import nnx

    from phi4_jax.inference.batching import serving_rules
    from phi4_jax.model import sharding
    from phi4_jax.model.config import get_preset
    from phi4_jax.model.decoder import Phi4ForCausalLM, logical_axes_tree, model_from_params

    config = get_preset("tiny", max_position_embeddings=256)
    model = Phi4ForCausalLM(config, rngs=nnx.Rngs(1))
    mesh = sharding.build_mesh("tensor=2")
    params = jax.device_put(model.params, sharding.tree_shardings(mesh, logical_axes_tree(config), serving_rules()))
    prompts = [list(range(3, 40)), list(range(50, 53)), list(range(100, 190))]
    want = [phi4_jax.generate(model, [p], max_new_tokens=8, stop_tokens=[])[0] for p in prompts]
    eng = ContinuousBatchingEngine(model_from_params(config, params), max_batch=2, page_size=16, prefill_chunk=16,
                                   mesh=mesh).start()
    try:
        assert eng.pages.k.sharding.spec[3] == "tensor"
        with recorded_compiles() as compiles:
            streams = [eng.submit(GenerationRequest(p, 8)) for p in prompts]
            assert [[e.token_id for e in s] for s in streams] == want
        assert compiles == []
    finally:
        eng.shutdown()


def test_engine_on_the_pallas_paged_kernel_equals_generate():
    """attention_impl="pallas_tpu" routes the engine's attention to the Pallas paged kernel (TPU interpreter here);
    greedy answers equal `generate` on the XLA path."""
    from flax import nnx

    from phi4_jax.model.config import get_preset
    from phi4_jax.model.decoder import Phi4ForCausalLM, model_from_params

    config = get_preset("tiny", max_position_embeddings=64)
    model = Phi4ForCausalLM(config, rngs=nnx.Rngs(2))
    prompt = list(range(3, 40))                    # three prefill chunks of 16
    want = phi4_jax.generate(model, [prompt], max_new_tokens=4, stop_tokens=[])[0]
    kernel_model = model_from_params(config.replace(attention_impl="pallas_tpu", kernel_interpret=True), model.params)
    eng = ContinuousBatchingEngine(kernel_model, max_batch=1, page_size=8, prefill_chunk=16).start()
    try:
        assert [e.token_id for e in eng.submit(GenerationRequest(prompt, 4))] == want
    finally:
        eng.shutdown()


def test_pool_sizing_from_free_memory_and_budget(converted, monkeypatch):
    """The pool takes KV_MEMORY_FRACTION of the free memory a device reports (or kv_cache_bytes); a request that
    could never fit it is refused at submit."""
    from phi4_jax.inference import batching
    from phi4_jax.inference.paged_cache import page_bytes

    model = converted[0]
    per_page = page_bytes(model.config, 8)
    monkeypatch.setattr(batching, "_free_device_bytes", lambda: 40 * per_page)
    eng = ContinuousBatchingEngine(model, max_batch=2, max_context=64, page_size=8)
    assert eng.stats()["pages_total"] == int(40 * per_page * batching.KV_MEMORY_FRACTION) // per_page - 1
    small = ContinuousBatchingEngine(model, max_batch=2, max_context=64, page_size=8, kv_cache_bytes=4 * per_page)
    assert small.stats()["pages_total"] == 3
    small.submit(GenerationRequest([5] * 10, 15))               # 24 positions: 3 pages
    with pytest.raises(GenerationError, match="needs 4 KV pages"):
        small.submit(GenerationRequest([5] * 10, 16))
    with pytest.raises(GenerationError, match="at least 2"):
        ContinuousBatchingEngine(model, max_context=64, page_size=8, kv_cache_bytes=per_page)


# ----------------------------------------------------------------------------- step loop speed (dispatch-ahead)

def test_stops_never_leak_a_token_with_dispatch_ahead(engine, converted, prompts, references):
    """Step k+1 is dispatched before step k's tokens are read, so a request that stops at step k has one more
    token computed: it must be dropped (not streamed, not counted), its slot and pages freed, and the extra
    key/value it wrote must not spoil the prefix cache (the next turn, built on the stopped answer, equals a full
    prefill's answer). Stops at the first token (sampled by the prefill chunk), the second, and mid-stream."""
    assert engine.per_layer and isinstance(engine.step_params["layers"], list)   # the CPU layout, built once
    layer_weights = engine.step_params["layers"]
    cases = [(0, 0), (1, 1), (2, 5), (3, 13), (4, NEW - 2)]   # (prompt, index of the stop token in its answer)
    stops = [references[i][j] for i, j in cases]
    want = [references[i][:references[i].index(stop) + 1] for (i, _), stop in zip(cases, stops)]
    before = engine.stats()
    streams = [engine.submit(GenerationRequest(prompts[i], NEW, stop_token_ids=(stop,)))
               for (i, _), stop in zip(cases, stops)]
    got = [[e.token_id for e in s] for s in streams]
    assert got == want
    assert all(s.finish_reason == "stop" and s.completion_tokens == len(w) for s, w in zip(streams, want))
    assert wait_until(lambda: engine.stats()["running"] == 0)
    after = engine.stats()
    assert after["tokens_generated"] - before["tokens_generated"] == sum(map(len, want))
    assert after["pages_in_use"] == 0
    # The next turn of the 300-token chat: its prompt's pages come from the prefix cache, written by the stopped
    # request (whose extra step wrote one more position than it kept).
    turn2 = prompts[2] + want[2] + [7, 8, 9]
    hits = after["prefix_cache_hits"]
    answer, _ = run(engine, GenerationRequest(turn2, NEW))
    assert engine.stats()["prefix_cache_hits"] - hits == (len(prompts[2]) + len(want[2]) - 1) // PAGE
    assert answer == hf_greedy(converted[1], turn2, NEW)
    assert engine.step_params["layers"] is layer_weights


def test_next_step_is_dispatched_before_the_previous_tokens_are_fetched(engine, prompts, references, monkeypatch):
    """While a request decodes, the engine plans (and dispatches) step k+1 before it fetches step k's tokens, and
    a decoding step takes the narrowest block table that holds its positions (not max_context's)."""
    events, widths = [], []
    plan, process, dispatch = engine._plan, engine._process, engine._dispatch

    def record_plan():
        step = plan()
        if step is not None:
            events.append(("dispatch", step.step_id))
        return step

    def record_process(step):
        events.append(("fetch", step.step_id))
        process(step)

    def record_dispatch(rows, tokens, feed, carry, start, n_new, steps, width):
        widths.append((max(int(np.max(start + n_new)), tokens.shape[1]), width))   # (positions to hold, width)
        return dispatch(rows, tokens, feed, carry, start, n_new, steps, width)

    monkeypatch.setattr(engine, "_plan", record_plan)
    monkeypatch.setattr(engine, "_process", record_process)
    monkeypatch.setattr(engine, "_dispatch", record_dispatch)
    assert run(engine, GenerationRequest(prompts[0], NEW))[0] == references[0]
    assert run(engine, GenerationRequest(prompts[2], NEW))[0] == references[2]
    assert wait_until(lambda: engine._pending is None)
    monkeypatch.undo()
    fetched = [k for kind, k in events if kind == "fetch"]
    dispatched = [k for kind, k in events if kind == "dispatch"]
    assert len(fetched) == len(dispatched) >= 2 * NEW
    ahead = [k for k in fetched if ("dispatch", k + 1) in events
             and events.index(("dispatch", k + 1)) < events.index(("fetch", k))]
    assert len(ahead) >= 2 * (NEW - 2)          # every step of a stream but its last has the next one queued first
    assert engine.table_widths() == [256 // PAGE, MAX_CONTEXT // PAGE]
    for positions, width in widths:
        assert width == (256 // PAGE if positions <= 256 else MAX_CONTEXT // PAGE), positions
    assert {w for _, w in widths} == {256 // PAGE, MAX_CONTEXT // PAGE}
    # decode: 3 row buckets at 2 widths; prefill: 4 chunk buckets (16, 32, 64, 128) at 2 widths
    assert len(engine.program_shapes()) == 3 * 2 + 4 * 2


# ----------------------------------------------------------------------------- pages on demand, preemption

SMALL_POOL = 8          # usable pages: the longest request below needs 6 alone, all six at once need 26


@pytest.fixture(scope="module")
def small_pool_engine(converted):
    """An engine driven on the test's thread (`run_to_completion`: deterministic steps) whose pool is far too small
    for its requests' prompts + max_new_tokens at once."""
    from phi4_jax.inference.paged_cache import page_bytes

    model = converted[0]
    return ContinuousBatchingEngine(model, max_batch=4, max_context=128, page_size=PAGE, prefill_chunk=32,
                                    kv_cache_bytes=(SMALL_POOL + 1) * page_bytes(model.config, PAGE))


def record_preemptions(engine, monkeypatch):
    """Wraps `engine._preempt`: records (victim's stream, tokens it had streamed, whether a step of it is in flight)."""
    seen, preempt = [], engine._preempt

    def recording(req):
        pending = engine._pending
        in_flight = pending is not None and (pending.prefill is req or req in pending.decoding)
        seen.append((req.stream, req.generated, in_flight))
        preempt(req)

    monkeypatch.setattr(engine, "_preempt", recording)
    return seen


def assert_no_leak(engine):
    stats = engine.stats()
    pool = engine.pool
    assert stats["running"] == stats["queue_length"] == stats["pages_in_use"] == 0
    assert not pool.refcount.any() and len(pool.free) + len(pool.evictable) == pool.pages_total


def test_pool_too_small_preempts_and_answers_equal_single_requests(small_pool_engine, converted, monkeypatch):
    """Six concurrent greedy requests whose prompts + max_new_tokens need three times the pool: requests are
    admitted on their prompt's pages, grow a page at a time, and the newest running one is preempted when the pool
    runs out (also with a step of it in flight) and recomputed later; each answer equals its single-request answer
    (on the same engine, never preempted) and transformers' greedy generate, and no page leaks.

    Counters: prefill_tokens counts each position prefilled for the first time, recomputed_tokens the positions a
    preempted request had written and prefills again. With nothing cached, the prompts' positions are all first
    prefills, plus, per preemption after k > 0 streamed tokens, the k-th token's position (streamed, never written
    yet); counted once per (request, k): a request preempted again before streaming more prefills it only once."""
    eng, hf_model = small_pool_engine, converted[1]
    rng = np.random.default_rng(21)
    prompts = [rng.integers(3, 311, n).tolist() for n in (5, 20, 33, 50, 12, 40)]
    budgets = [40, 45, 30, 39, 50, 35]
    alone, before = [], eng.stats()
    for p, n in zip(prompts, budgets):
        stream = eng.submit(GenerationRequest(p, n))
        eng.run_to_completion([stream])
        alone.append([e.token_id for e in stream])
    mid = eng.stats()
    assert mid["preemptions"] == mid["recomputed_tokens"] == 0
    assert mid["prefill_tokens"] - before["prefill_tokens"] == sum(map(len, prompts))
    assert alone == [hf_greedy(hf_model, p, n) for p, n in zip(prompts, budgets)]
    with eng._lock:   # empty the prefix cache: the requests below find none of the pages written above
        eng.pool.release(eng.pool.allocate(eng.pool.available()))
    seen = record_preemptions(eng, monkeypatch)
    streams = [eng.submit(GenerationRequest(p, n)) for p, n in zip(prompts, budgets)]
    eng.run_to_completion(streams)
    assert [[e.token_id for e in s] for s in streams] == alone
    assert all(s.finish_reason == "length" and s.completion_tokens == n for s, n in zip(streams, budgets))
    after = eng.stats()
    assert after["preemptions"] == len(seen) > 0
    assert any(generated > 0 and in_flight for _, generated, in_flight in seen)   # mid-stream, a step in flight
    streamed_then_preempted = {(id(stream), generated) for stream, generated, _ in seen if generated > 0}
    assert after["prefill_tokens"] - mid["prefill_tokens"] == sum(map(len, prompts)) + len(streamed_then_preempted)
    recomputed = after["recomputed_tokens"] - mid["recomputed_tokens"]
    assert 0 < recomputed <= sum(stream.prompt_tokens + generated for stream, generated, _ in seen)
    assert_no_leak(eng)


def test_request_scoring_its_prompt_preempted_in_prefill_scores_it_again(small_pool_engine, converted, monkeypatch):
    """A request scoring its 80-token prompt is preempted after its first prefill chunk (the older request decoding
    beside it needs the page): its in-flight chunk is dropped, and re-admitted it prefills and scores the whole
    prompt again (nothing from the prefix cache), so its prompt logprobs and tokens equal its unpreempted run's and
    transformers' log-softmax; no page leaks."""
    eng, hf_model = small_pool_engine, converted[1]
    rng = np.random.default_rng(41)
    older, scored = rng.integers(3, 311, 47).tolist(), rng.integers(3, 311, 80).tolist()   # 3 + 5 pages: the pool
    alone = eng.submit(GenerationRequest(scored, 4, prompt_logprobs=2))
    eng.run_to_completion([alone])
    seen = record_preemptions(eng, monkeypatch)
    streams = [eng.submit(GenerationRequest(older, 30)), eng.submit(GenerationRequest(scored, 4, prompt_logprobs=2))]
    eng.run_to_completion(streams)
    assert [(s is streams[1], generated) for s, generated, _ in seen] == [(True, 0)]   # preempted in its prefill
    assert [e.token_id for e in streams[1]] == [e.token_id for e in alone] == hf_greedy(hf_model, scored, 4)
    logits = hf_logits(hf_model, [scored])[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    for events in (alone.prompt_logprobs, streams[1].prompt_logprobs):
        assert events[0] is None and [e.token_id for e in events[1:]] == scored[1:]
        np.testing.assert_allclose([e.logprob for e in events[1:]], [logp[s - 1, scored[s]] for s in range(1, 80)],
                                   atol=1e-4)
        assert [[i for i, _ in e.top_logprobs] for e in events[1:]] == [
            np.argsort(-logp[s - 1], kind="stable")[:2].tolist() for s in range(1, 80)]
    assert_no_leak(eng)


def test_seeded_request_preempted_mid_stream_samples_the_same_tokens(small_pool_engine, converted, monkeypatch):
    """A sampled request with a seed, submitted last (so it is the one preempted) while older greedy requests fill
    the pool, streams the same tokens as `generate` with that seed: its stream resumes without repeating a token,
    and its k-th token is still drawn with fold_in(key(seed), k)."""
    eng = small_pool_engine
    rng = np.random.default_rng(5)
    sampled = dict(temperature=0.9, top_p=0.9)
    prompt = rng.integers(3, 311, 30).tolist()
    want = phi4_jax.generate(converted[0], [prompt], max_new_tokens=60, seed=[77], stop_tokens=[], **sampled)[0]
    seen = record_preemptions(eng, monkeypatch)
    others = [eng.submit(GenerationRequest(rng.integers(3, 311, 40).tolist(), 60)) for _ in range(3)]
    target = eng.submit(GenerationRequest(prompt, 60, seed=77, logprobs=1, **sampled))
    eng.run_to_completion(others + [target])
    events = list(target)
    assert [e.token_id for e in events] == want and target.completion_tokens == 60
    assert any(stream is target and generated > 0 for stream, generated, _ in seen)
    assert all(e.top_logprobs is not None for e in events)
    assert_no_leak(eng)


def test_metrics_and_stats_report_preemptions(small_pool_engine):
    """The server's Prometheus text counts the engine's preemptions."""
    from phi4_jax.serve.metrics import ServerMetrics

    eng = small_pool_engine
    streams = [eng.submit(GenerationRequest(list(range(3 + i, 43 + i)), 60)) for i in range(3)]   # 3 x 6 pages
    eng.run_to_completion(streams)
    text = ServerMetrics(eng).render().decode()
    stats = eng.stats()
    count, recomputed = stats["preemptions"], stats["recomputed_tokens"]
    assert count > 0 and f"phi4_serve_preemptions_total {float(count)}" in text
    assert recomputed > 0 and f"phi4_serve_recomputed_tokens_total {float(recomputed)}" in text


def test_dropped_chat_session_releases_its_pages(converted):
    """A ChatSession garbage-collected without reset() frees its held pages, also when the collection runs while
    the engine's lock is held (as on the engine's own thread mid-step): then at the engine's next admission."""
    import gc

    from phi4_jax.inference.chat_session import ChatSession

    model = converted[0]
    session = ChatSession(model, max_context=128, stop_tokens=[])
    session.generate(list(range(3, 40)), max_new_tokens=5)
    engine = session._engine
    assert engine.stats()["pages_in_use"] == -(-session.cached_length // PAGE) > 0
    del session
    gc.collect()
    assert engine.stats()["pages_in_use"] == 0

    session = ChatSession(model, max_context=128, stop_tokens=[])
    session.generate(list(range(3, 40)), max_new_tokens=5)
    with engine._lock:
        del session
        gc.collect()                               # the finalizer must not wait for the lock
        assert engine.pool.pages_in_use > 0        # not freed yet: the lock is held
    assert engine.stats()["pages_in_use"] == 0


# ----------------------------------------------------------------------------- held sequences evicted, queue limit

def test_held_sequence_is_evicted_before_a_running_request_is_preempted(small_pool_engine, converted, monkeypatch):
    """A request growing into the pages a HeldSequence holds evicts it (`held_evictions`) instead of preempting
    itself; resuming the evicted sequence answers the same as resuming it from its held pages, and as transformers'
    greedy generate. The server's Prometheus text counts the eviction."""
    from phi4_jax.serve.metrics import ServerMetrics

    eng, hf_model = small_pool_engine, converted[1]
    rng = np.random.default_rng(31)
    prompt, extra = rng.integers(3, 311, 40).tolist(), rng.integers(3, 311, 10).tolist()

    def first_turn():
        stream = eng.submit(GenerationRequest(prompt, 8), hold=True)
        eng.run_to_completion([stream])
        return [e.token_id for e in stream], stream.held

    answer, held = first_turn()
    follow = prompt + answer + extra
    before = eng.stats()["held_evictions"]
    kept = eng.submit(GenerationRequest(follow, 12), resume=held)
    eng.run_to_completion([kept])
    want = [e.token_id for e in kept]
    assert kept.cached_tokens == len(held.tokens) == 47 and eng.stats()["held_evictions"] == before
    assert want == hf_greedy(hf_model, follow, 12)

    again, held = first_turn()
    assert again == answer and eng.stats()["pages_in_use"] == 3 and not held.evicted
    seen = record_preemptions(eng, monkeypatch)
    grower = eng.submit(GenerationRequest(rng.integers(3, 311, 40).tolist(), 60))   # 7 of the 8 pages at its end
    steps = iter(range(200))      # it needs ~65 steps; preempting itself instead would loop for ever
    eng.run_to_completion([grower], on_step=lambda: next(steps))
    assert grower.finish_reason == "length" and seen == []
    assert held.evicted and held.pages is None and eng.stats()["held_evictions"] == before + 1
    text = ServerMetrics(eng).render().decode()
    assert f"phi4_serve_held_evictions_total {float(before + 1)}" in text
    resumed = eng.submit(GenerationRequest(follow, 12), resume=held)
    eng.run_to_completion([resumed])
    assert [e.token_id for e in resumed] == want
    assert not held.evicted       # used up
    with pytest.raises(GenerationError, match="resume must be"):
        eng.submit(GenerationRequest(follow, 1), resume=held)
    assert_no_leak(eng)
    assert eng._held == {}


def test_held_sequence_released_soon_while_the_engine_evicts_it(small_pool_engine, converted, monkeypatch):
    """A HeldSequence whose `release_soon` (a dropped ChatSession's finalizer, on another thread) is in flight when
    the engine, mid-step and holding its lock, looks for one to evict: the finalizer has taken the pages but cannot
    free them (the lock is held), so the eviction skips it (not counted as evicted) and the pages are freed at the
    next admission. Deterministic: the finalizer runs to its end on a thread the test joins, at the engine's first
    eviction, under the engine's lock. Afterwards no page leaks, no registry entry is left, and the request that
    needed the pages answers as transformers' greedy generate. Then the other order: release_soon after an eviction
    frees nothing twice."""
    import threading

    eng, hf_model = small_pool_engine, converted[1]
    assert_no_leak(eng)
    rng = np.random.default_rng(41)
    first = eng.submit(GenerationRequest(rng.integers(3, 311, 40).tolist(), 8), hold=True)
    eng.run_to_completion([first])
    held, before = first.held, eng.stats()
    assert held.pages is not None and before["pages_in_use"] == 3

    evict, calls = eng._evict_held, []

    def evict_while_released(*args):
        if not calls:
            assert eng._lock.locked() and held.pages is not None
            finalizer = threading.Thread(target=eng.release_soon, args=(held,))
            finalizer.start()
            finalizer.join(timeout=30)          # it cannot take the lock: the pages wait in _dropped_held
            assert not finalizer.is_alive(), "release_soon blocked on the engine's lock"
            assert held.pages is None and len(eng._dropped_held) == 1 and id(held) in eng._held
        calls.append(evict(*args))
        return calls[-1]

    monkeypatch.setattr(eng, "_evict_held", evict_while_released)
    prompt = rng.integers(3, 311, 40).tolist()
    grower = eng.submit(GenerationRequest(prompt, 60))   # 7 of the 8 pages at its end: it needs the held ones
    steps = iter(range(400))
    eng.run_to_completion([grower], on_step=lambda: next(steps))
    assert calls and calls[0] is False          # nothing to evict: the only held sequence was being released
    assert [e.token_id for e in grower] == hf_greedy(hf_model, prompt, 60)
    after = eng.stats()
    assert after["held_evictions"] == before["held_evictions"] and not held.evicted
    assert eng._held == {} and not eng._dropped_held
    assert_no_leak(eng)

    monkeypatch.setattr(eng, "_evict_held", evict)
    second = eng.submit(GenerationRequest(rng.integers(3, 311, 40).tolist(), 8), hold=True)
    eng.run_to_completion([second])
    with eng._lock:
        assert eng._evict_held() and second.held.evicted
        eng.release_soon(second.held)           # the finalizer after the eviction: nothing left to free
    assert eng._held == {} and not eng._dropped_held
    assert_no_leak(eng)


def test_idle_chat_session_is_evicted_for_another_one(converted):
    """Two ChatSessions on one batch-1 engine whose pool holds one max_context sequence: the second session's turn
    evicts the idle first session's held pages (before, it was refused or got a second engine); the first session's
    next turn reuses what the prefix cache still holds of its conversation (its head: pages are freed last page
    first) and answers as transformers' greedy generate."""
    from phi4_jax.inference.chat_session import ChatSession
    from phi4_jax.model.decoder import model_from_params

    # a model object of its own: `shared_engine` (one engine per model) then sizes the engine for these sessions
    model, hf_model = model_from_params(converted[0].config, converted[0].params), converted[1]
    rng = np.random.default_rng(41)
    first, second = ChatSession(model, max_context=128, stop_tokens=[]), ChatSession(model, max_context=128,
                                                                                    stop_tokens=[])
    prompt = rng.integers(3, 311, 60).tolist()
    assert first.generate(prompt, max_new_tokens=5) == hf_greedy(hf_model, prompt, 5)
    engine = first._engine
    assert first.cached_length == 64 and engine.stats()["pages_in_use"] == 4 == engine.pool.pages_total // 2
    before = engine.stats()["held_evictions"]
    other = rng.integers(3, 311, 70).tolist()                # 5 pages: more than the 4 free ones
    assert second.generate(other, max_new_tokens=5) == hf_greedy(hf_model, other, 5)
    assert second._engine is engine and engine.stats()["held_evictions"] == before + 1
    assert first.cached_length == 0
    conversation = first.tokens + rng.integers(3, 311, 10).tolist()
    assert first.generate(conversation, max_new_tokens=8) == hf_greedy(hf_model, conversation, 8)
    assert first.last_turn["reused"] == 48 and not first.last_turn["rebuilt"]   # 3 of its 4 pages were still cached
    first.reset()
    second.reset()
    assert engine.stats()["pages_in_use"] == 0


@pytest.fixture(scope="module")
def one_waiting_engine(converted):
    """`small_pool_engine`'s sizes (so its compiled programs) with max_queue=1."""
    from phi4_jax.inference.paged_cache import page_bytes

    model = converted[0]
    return ContinuousBatchingEngine(model, max_batch=4, max_context=128, page_size=PAGE, prefill_chunk=32,
                                    max_queue=1, kv_cache_bytes=(SMALL_POOL + 1) * page_bytes(model.config, PAGE))


def drive(engine, streams, on_step):
    """`run_to_completion` with `on_step(engine)` after each step."""
    engine.run_to_completion(streams, on_step=lambda: on_step(engine))


def test_preempted_request_requeued_past_max_queue_and_counted_by_submit(one_waiting_engine, small_pool_engine,
                                                                          monkeypatch):
    """max_queue=1: a request preempted while another waits goes back to the queue anyway (2 waiting: it was
    accepted), a submit then sees the queue full (QueueFullError), and every answer equals its single-request
    answer."""
    eng = one_waiting_engine
    rng = np.random.default_rng(51)
    requests = [GenerationRequest(rng.integers(3, 311, n).tolist(), budget) for n, budget in ((40, 60), (20, 60),
                                                                                              (100, 10))]
    alone = []
    for request in requests:
        stream = small_pool_engine.submit(request)
        small_pool_engine.run_to_completion([stream])
        alone.append([e.token_id for e in stream])
    seen = record_preemptions(eng, monkeypatch)
    streams, refused = [eng.submit(requests[0])], []

    def on_step(engine):
        stats = engine.stats()
        if stats["queue_length"] == 0 and len(streams) < 3:      # A, then B once A is admitted, then C
            streams.append(engine.submit(requests[len(streams)]))
        elif stats["queue_length"] == 2 and not refused:         # B preempted while C waits
            with pytest.raises(QueueFullError):
                engine.submit(GenerationRequest([5, 6, 7], 1))
            refused.append(stats)

    drive(eng, streams, on_step)     # runs until the streams added on the way are finished too
    assert len(streams) == 3 and refused and seen and all(stream is streams[1] for stream, _, _ in seen)
    assert [[e.token_id for e in s] for s in streams] == alone
    assert_no_leak(eng)


def test_request_cancelled_while_waiting_after_preemption(one_waiting_engine, monkeypatch):
    """A preempted request waiting alone fills a max_queue=1 queue (a submit is refused); cancelled before it is
    re-admitted, it leaves the queue at once, its stream ends "cancelled" after the tokens it had streamed (nothing
    more comes, also from its step that was in flight), and nothing leaks."""
    eng = one_waiting_engine
    rng = np.random.default_rng(61)
    seen = record_preemptions(eng, monkeypatch)
    older = eng.submit(GenerationRequest(rng.integers(3, 311, 40).tolist(), 80))    # all 8 pages at its end
    second = GenerationRequest(rng.integers(3, 311, 20).tolist(), 60)
    streams, cancelled = [older], []

    def on_step(engine):
        if len(streams) == 1 and engine.stats()["queue_length"] == 0:      # submitted once the older one is admitted
            streams.append(engine.submit(second))
        newer = streams[-1]
        if seen and engine.stats()["queue_length"] == 1 and not cancelled:     # preempted, not re-admitted
            assert not newer.finished
            with pytest.raises(QueueFullError):
                engine.submit(GenerationRequest([5, 6, 7], 1))
            streamed = newer.take_ready()
            newer.cancel()
            cancelled.append(streamed)
            assert engine.stats()["queue_length"] == 0

    drive(eng, streams, on_step)
    newer = streams[1]
    assert newer.finish_reason == "cancelled" and list(newer) == []
    assert cancelled and len(cancelled[0]) == seen[-1][1] == newer.completion_tokens > 0
    assert older.finish_reason == "length" and older.completion_tokens == 80
    assert_no_leak(eng)


def test_mixed_workload_leaks_no_page(small_pool_engine):
    """Held (released, resumed, evicted, evicted then resumed), cancelled, preempted and finished requests together:
    afterwards no page is in use (only the prefix cache keeps pages) and no reference count is left."""
    eng = small_pool_engine
    rng = np.random.default_rng(71)
    start = eng.stats()
    holds = [eng.submit(GenerationRequest(rng.integers(3, 311, n).tolist(), 6), hold=True) for n in (20, 33, 18)]
    plain = [eng.submit(GenerationRequest(rng.integers(3, 311, n).tolist(), 50)) for n in (40, 25, 30)]
    to_cancel = eng.submit(GenerationRequest(rng.integers(3, 311, 30).tolist(), 50))
    drive(eng, holds + plain, lambda engine: to_cancel.cancel() if plain[2].completion_tokens > 3 else None)
    resume = holds[0].held
    resumed = eng.submit(GenerationRequest(resume.tokens + [7, 8, 9], 30), hold=True, resume=resume)
    eng.run_to_completion([resumed] + [eng.submit(GenerationRequest(rng.integers(3, 311, 50).tolist(), 60))])
    eng.release(holds[1].held)
    evicted = [s.held for s in (holds[2], resumed) if s.held.evicted]
    for held in evicted:
        eng.run_to_completion([eng.submit(GenerationRequest(held.tokens + [5], 3), resume=held)])
    last = eng.submit(GenerationRequest([3, 4, 5, 6], 4), hold=True)
    eng.run_to_completion([last])
    eng.release_soon(last.held)             # as a dropped ChatSession's finalizer does
    eng.release(holds[2].held)
    eng.release(resumed.held)
    stats = eng.stats()
    assert to_cancel.finish_reason == "cancelled" and stats["preemptions"] > start["preemptions"]
    assert stats["held_evictions"] > start["held_evictions"] and evicted
    assert stats["pages_cached"] > 0 and eng._held == {}
    assert_no_leak(eng)
