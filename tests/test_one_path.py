"""One decode path: `generate`, `ChatSession`, PTS rollouts and a server request all run on the model's shared
`ContinuousBatchingEngine` (its `_step`), and the old contiguous decode loop is gone.

Tiny random model (fp32), module-scoped; every call fits one engine size (4 slots of 64 tokens), so the engine's
programs compile once. Greedy `generate` itself is checked
against transformers in tests/test_generation.py; here the paths are checked against each other and the page
bookkeeping (held pages, prefix sharing, a rewind into a cached page) against `generate`'s answers.
"""

import jax
import numpy as np
import pytest

import phi4_jax
from phi4_jax.inference import batching, chat_session, engine
from phi4_jax.inference.batching import ContinuousBatchingEngine, GenerationRequest
from phi4_jax.model.config import get_preset
from phi4_jax.model.decoder import model_from_params
from phi4_jax.posttrain import pts
from phi4_jax.train.step import init_params

NEW = 6


@pytest.fixture(scope="module")
def model():
    config = get_preset("tiny", compute_dtype="float32", param_dtype="float32", max_position_embeddings=256)
    return model_from_params(config, init_params(config, jax.random.key(11)))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    return [rng.integers(3, 500, n).tolist() for n in (40, 7, 12)]   # prefill chunks of 64 and 16 only


@pytest.fixture
def steps(monkeypatch):
    """The engines whose `_step` ran, in order (one entry per step)."""
    ran = []
    real = ContinuousBatchingEngine._step

    def counted(self):
        ran.append(self)
        return real(self)

    monkeypatch.setattr(ContinuousBatchingEngine, "_step", counted)
    return ran


def test_the_old_decode_loop_is_gone():
    for name in ("run_decode", "_decode_loop", "_decode_one", "prefill_and_sample", "extend_and_sample",
                 "grow_cache", "per_layer_decode", "run_options"):
        assert not hasattr(engine, name), name


def test_generate_chat_pts_and_a_server_request_share_one_engine(model, prompts, steps):
    """Every path steps the same engine object, and a server-style request (the engine's background thread, a
    stream iterated as the server does) gives `generate`'s tokens."""
    out = phi4_jax.generate(model, prompts, max_new_tokens=NEW, stop_tokens=[])
    shared = steps[-1]
    assert steps and set(steps) == {shared}
    assert shared is engine.shared_engine(model, batch=1, context=64)     # cached per model; it fits
    del steps[:]

    session = chat_session.ChatSession(model, stop_tokens=[], max_context=64)
    assert session.generate(prompts[1], max_new_tokens=NEW) == out[1]
    sampler = pts.ModelSampler(model, temperature=1.0, max_new_tokens=4, stop_tokens=[])
    rollouts = sampler.rollouts(prompts[2], 2, seed=9)
    assert rollouts == phi4_jax.generate(model, [prompts[2]] * 2, max_new_tokens=4, temperature=1.0, seed=[9, 10],
                                         stop_tokens=[])
    assert set(steps) == {shared}
    session.reset()

    shared.start()          # the server's way: a background step loop, the request's stream iterated
    try:
        stream = shared.submit(GenerationRequest(prompts[0], NEW))
        assert [event.token_id for event in stream] == out[0]
        assert stream.finish_reason == "length"
    finally:
        shared.shutdown()
    assert engine.shared_engine(model, batch=1, context=64) is not shared    # a started engine is not reused


def test_chat_turns_prefill_only_new_tokens_and_pts_rollouts_share_prefix_pages(model, prompts):
    """A resumed turn prefills exactly the tokens after the held ones; K rollouts of one context share the pages of
    its prepared prefix (prefix-cache hits) and prefill only the rest."""
    session = chat_session.ChatSession(model, stop_tokens=[], max_context=64)
    first = session.generate(prompts[0], max_new_tokens=NEW)
    shared = session._engine
    conversation = prompts[0] + first + prompts[1]
    before = shared.stats()["prefill_tokens"]
    second = session.generate(conversation, max_new_tokens=NEW)
    assert shared.stats()["prefill_tokens"] - before == session.last_turn["prefilled"] == len(prompts[1]) + 1
    assert second == phi4_jax.generate(model, [conversation], max_new_tokens=NEW, stop_tokens=[])[0]
    session.reset()

    sampler = pts.ModelSampler(model, temperature=1.0, max_new_tokens=4, stop_tokens=[])
    sequence = prompts[0] + prompts[2]                        # 52 tokens: 3 full pages
    sampler.prepare(sequence)
    sampler.rollouts(sequence[:50], 4, seed=1)                # sizes the sampler's engine for 4 rows
    stats = sampler._engine.stats()
    got = sampler.rollouts(sequence[:37], 4, seed=1)
    after = sampler._engine.stats()
    page = sampler._engine.page_size
    assert after["prefix_cache_hits"] - stats["prefix_cache_hits"] == 4 * ((37 - 1) // page)
    assert after["prefill_tokens"] - stats["prefill_tokens"] == 4 * (37 - (37 - 1) // page * page)
    assert got == phi4_jax.generate(model, [sequence[:37]] * 4, max_new_tokens=4, temperature=1.0,
                                    seed=[1, 2, 3, 4], stop_tokens=[])


def test_a_rewind_into_a_cached_page_does_not_corrupt_the_prefix_cache(model, prompts):
    """A turn that diverges inside a full page the prefix cache holds takes that page out of the cache before
    overwriting it: a later request with the original prefix still gets the original answer."""
    original = prompts[0] + prompts[2][:10]                   # 50 tokens: 3 full pages
    want = phi4_jax.generate(model, [original], max_new_tokens=NEW, stop_tokens=[])[0]
    session = chat_session.ChatSession(model, stop_tokens=[], max_context=64)
    session.generate(original, max_new_tokens=NEW)
    diverged = original[:20] + [(t + 1) % 500 for t in original[20:30]]       # diverges inside page 1
    got = session.generate(diverged, max_new_tokens=NEW)
    assert session.last_turn["reused"] == 20
    assert got == phi4_jax.generate(model, [diverged], max_new_tokens=NEW, stop_tokens=[])[0]
    assert phi4_jax.generate(model, [original], max_new_tokens=NEW, stop_tokens=[])[0] == want
    session.reset()


def test_an_error_while_driving_frees_the_requests_pages(model, prompts):
    """A callback that raises (Ctrl-C while streaming) cancels the call's requests: their slots and pages are free
    at once and the engine serves the next call."""
    shared = engine.shared_engine(model, batch=2, context=64)

    def interrupt(column):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        phi4_jax.generate(model, prompts[1:], max_new_tokens=NEW, stop_tokens=[], callback=interrupt)
    stats = shared.stats()
    assert stats["running"] == stats["queue_length"] == stats["pages_in_use"] == 0
    assert phi4_jax.generate(model, prompts[1:2], max_new_tokens=2, stop_tokens=[])[0] == \
        phi4_jax.generate(model, prompts[1:], max_new_tokens=2, stop_tokens=[])[0]
    with pytest.raises(batching.GenerationError, match="HeldSequence"):
        shared.submit(GenerationRequest(prompts[1], 1), resume=object())
