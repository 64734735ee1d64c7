"""Generation: greedy parity with transformers' generate, batching, the KV cache, sampling, stops, limits.

One tiny random Phi3ForCausalLM is saved by transformers, converted with the real `convert_weights.py` CLI,
and loaded with `phi4_jax.load_model` (module-scoped, so every compiled program is reused).
"""


import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracle
import pytest
from hf_models import convert_tiny_phi3

import phi4_jax
from phi4_jax.inference import batching, chat_session, engine, kv_cache, sampling
from phi4_jax.inference.errors import ContextLengthError, GenerationError
from phi4_jax.model.decoder import forward, model_from_params

EOS = 2  # the tiny HF config's eos_token_id
PROMPT_LENGTHS = (3, 29, 300, 70)  # one over 256: RoPE and the cache at real offsets
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(our model, the transformers model) for one tiny random checkpoint converted through the CLI."""
    root = tmp_path_factory.mktemp("gen")
    dst, hf_model = convert_tiny_phi3(root, seed=3)
    model = phi4_jax.load_model(dst, dtype=jnp.float32)
    assert model.config.compute_dtype == "float32"
    return model, hf_model


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(3, 311, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def greedy_batched(converted, prompts):
    model, _ = converted
    return phi4_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[])


def hf_greedy(hf_model, prompt, n, eos=None):
    import torch

    hf_model.generation_config.eos_token_id = eos
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_generate(converted, prompts, greedy_batched):
    _, hf_model = converted
    for prompt, ours in zip(prompts, greedy_batched):
        assert len(ours) == NEW_TOKENS
        assert ours == hf_greedy(hf_model, prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens differs"
    assert len(set(map(tuple, greedy_batched))) == len(prompts)


def test_greedy_stops_like_transformers(converted, prompts, greedy_batched):
    """Stop at a token the model actually emits: same tokens, same place as transformers with that eos."""
    model, hf_model = converted
    stop = greedy_batched[2][10]
    ours = phi4_jax.generate(model, prompts[2:3], max_new_tokens=NEW_TOKENS, stop_tokens=[stop])[0]
    assert ours[-1] == stop and len(ours) <= 11
    assert ours == hf_greedy(hf_model, prompts[2], NEW_TOKENS, eos=stop)


def test_batched_equals_one_by_one(converted, prompts, greedy_batched):
    model, _ = converted
    for prompt, batched in zip(prompts, greedy_batched):
        assert phi4_jax.generate(model, [prompt], max_new_tokens=NEW_TOKENS, stop_tokens=[])[0] == batched
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=3, stop_tokens=[])
    sampled = phi4_jax.generate(model, prompts[:2], seed=[11, 12], **kw)
    assert sampled == [phi4_jax.generate(model, [p], seed=[s], **kw)[0] for p, s in zip(prompts[:2], (11, 12))]


def test_cached_decode_equals_full_recompute(converted, prompts):
    """Prefill + decode steps through the cache give the logits of model.forward on the whole sequence."""
    model, _ = converted
    params, config = model.params, model.config
    batch = [prompts[0], prompts[1]]
    steps = 6
    lengths = np.array([len(p) for p in batch], np.int32)
    tokens = np.zeros((2, 32), np.int32)
    for i, p in enumerate(batch):
        tokens[i, :len(p)] = p
    prefill = jax.jit(kv_cache.prefill, static_argnums=(3, 4))
    step = jax.jit(kv_cache.decode_step, static_argnums=(3,))
    cache, logits = prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), config, 64)
    assert cache.k.shape == (config.num_layers, 2, 64, config.num_kv_heads, config.head_dim)
    seqs = [list(p) for p in batch]
    cached_logits = [logits]
    for _ in range(steps):
        nxt = np.asarray(jnp.argmax(cached_logits[-1], -1))
        for s, t in zip(seqs, nxt):
            s.append(int(t))
        cache, logits = step(params, cache, jnp.asarray(nxt, jnp.int32), config)
        cached_logits.append(logits)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + steps)
    for b, seq in enumerate(seqs):
        full = np.asarray(forward(params, jnp.asarray([seq]), config))[0]
        for j in range(steps + 1):
            pos = len(batch[b]) - 1 + j
            np.testing.assert_allclose(np.asarray(cached_logits[j][b]), full[pos], rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible(converted, prompts):
    model, _ = converted
    kw = dict(max_new_tokens=16, temperature=1.0, stop_tokens=[])
    a = phi4_jax.generate(model, prompts[:2], seed=5, top_k=3, **kw)
    assert a == phi4_jax.generate(model, prompts[:2], seed=5, top_k=3, **kw)
    assert a != phi4_jax.generate(model, prompts[:2], seed=6, top_k=3, **kw)
    # top_k=1 leaves only the argmax: sampling at any temperature is greedy
    greedy = phi4_jax.generate(model, prompts[:2], max_new_tokens=16, stop_tokens=[])
    assert phi4_jax.generate(model, prompts[:2], seed=1, top_k=1, **kw) == greedy


def _allowed(logits, top_k, top_p):
    order = np.argsort(-logits, kind="stable")
    keep = order[:top_k] if top_k else order
    if top_p is not None:
        vals = logits[keep] - logits[keep].max()
        probs = np.exp(vals) / np.exp(vals).sum()
        before = np.cumsum(probs) - probs
        keep = keep[before < top_p]
    return set(keep.tolist())


def _draw_rows(logits, steps, temperature, top_k, top_p, native=False):
    """`sampling.sample_rows` at each of `steps` (one setting per row) -> drawn tokens [steps, B]; with `native`,
    with the CPU engine's native argmax and top-k/top-p filter (kernels/cpu_native)."""
    b = logits.shape[0]
    keys = sampling.sequence_keys(0, b)
    rows = lambda value, dtype: jnp.broadcast_to(jnp.asarray(value, dtype), (b,))  # noqa: E731
    kernels = {}
    if native:
        from kernels import cpu_native

        kernels = {"argmax": cpu_native.argmax, "restrict": cpu_native.sampling_filter}
    draw = jax.jit(jax.vmap(lambda s: sampling.sample_rows(
        logits, keys, jnp.full((b,), s, jnp.int32), rows(temperature, jnp.float32), rows(top_k, jnp.int32),
        rows(top_p, jnp.float32), **kernels)))
    return np.asarray(draw(jnp.arange(steps)))


def _native_available() -> bool:
    from kernels import cpu_native

    return cpu_native.available("phi4_cpu_sampling_filter")


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _native_available(), reason="native CPU kernels unavailable"))], ids=["xla", "native"])
@pytest.mark.parametrize("top_k,top_p", [(7, None), (None, 0.6), (12, 0.5), ((1, 7, 0, 64), (1.0, 0.5, 0.3, 1.0))])
def test_top_k_top_p_never_emit_excluded_tokens(top_k, top_p, native):
    """Per-row settings (the last case mixes them in one batch, as the engine's rows do), with XLA's masks and with
    the CPU engine's native filter."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 64)) * 2.0, jnp.float32)
    drawn = _draw_rows(logits, 400, 1.0, 0 if top_k is None else top_k, 1.0 if top_p is None else top_p, native)
    for b in range(4):
        k = top_k[b] if isinstance(top_k, tuple) else top_k
        p = top_p[b] if isinstance(top_p, tuple) else top_p
        allowed = _allowed(np.asarray(logits[b]), k, p)
        seen = set(drawn[:, b].tolist())
        assert seen <= allowed, f"sequence {b} drew excluded tokens {sorted(seen - allowed)}"
        assert len(seen) >= min(2, len(allowed))
    # temperature 0 rows are greedy whatever their top_k / top_p
    greedy = _draw_rows(logits, 3, jnp.asarray([0.0, 1.0, 0.0, 1.0]), 0 if top_k is None else top_k,
                        1.0 if top_p is None else top_p, native)
    np.testing.assert_array_equal(greedy[:, [0, 2]], np.broadcast_to(np.argmax(np.asarray(logits), -1)[[0, 2]], (3, 2)))


def test_top_k_mask_equals_sorted_definition():
    """The k largest logits of each row, from float64 NumPy's sort; ties at the boundary all kept; 0 keeps all."""
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(5, 3000)) * 3.0).astype(np.float32)
    logits[1, :10] = -np.inf                                        # masked entries (after top-p, say)
    logits[2, 100:104] = np.sort(logits[2])[-5]                     # ties at the 5th largest value
    ks = np.array([1, 17, 5, 0, 2999], np.int32)
    got = np.asarray(jax.jit(sampling.top_k_mask)(jnp.asarray(logits), jnp.asarray(ks)))
    for b, k in enumerate(ks):
        np.testing.assert_array_equal(got[b], numpy_oracle.top_k_kept(logits[b], k), err_msg=f"row {b}, k {k}")
    assert got[2].sum() == 4 + 1 + 4                                # the 4 larger, the 5th and its 4 copies


@pytest.mark.parametrize("scale", [0.01, 1.0, 4.0, 30.0])  # flat ... peaked (one token above top_p)
def test_top_p_mask_equals_sorted_definition(scale):
    rng = np.random.default_rng(int(scale * 100))
    logits = (rng.normal(size=(6, 5000)) * scale).astype(np.float32)
    mask_fn = jax.jit(sampling.top_p_mask)
    for top_p in (0.05, 0.3, 0.6, 0.9, 0.999, 1.0):
        got = np.asarray(mask_fn(jnp.asarray(logits), np.float32(top_p)))
        for b in range(logits.shape[0]):
            want, before = numpy_oracle.nucleus(logits[b], top_p)
            # float32 sums differ from the float64 reference only for a token whose preceding mass is top_p
            # within rounding; every other token must be decided the same way
            decided = np.abs(before - top_p) > 1e-5
            assert want.any() and got[b].any()
            np.testing.assert_array_equal(got[b][decided], want[decided], err_msg=f"scale {scale} top_p {top_p}")
    # sampling with top_p alone draws only nucleus tokens, and both sides of a wide nucleus
    drawn = _draw_rows(jnp.asarray(logits), 200, 1.0, 0, 0.6)
    for b in range(logits.shape[0]):
        allowed = np.flatnonzero(numpy_oracle.nucleus(logits[b], 0.6)[0])
        assert set(drawn[:, b].tolist()) <= set(allowed.tolist())
        assert len(set(drawn[:, b].tolist())) >= min(2, len(allowed))


def test_generated_samples_stay_in_top_k_of_the_model(converted, prompts, greedy_batched):
    model, _ = converted
    outs = phi4_jax.generate(model, prompts[:2], max_new_tokens=16, temperature=1.5, top_k=3, seed=2,
                             stop_tokens=[])
    for prompt, new in zip(prompts[:2], outs):
        logits = np.asarray(model(jnp.asarray([prompt + new])))[0]
        for j, token in enumerate(new):
            assert token in np.argsort(-logits[len(prompt) - 1 + j])[:3]
    assert any(o != g[:16] for o, g in zip(outs, greedy_batched))  # it did sample, not just take the argmax


def test_stop_tokens_end_sequences_independently(converted, prompts, greedy_batched):
    model, _ = converted
    stop = greedy_batched[0][5]
    expected = []
    for seq in greedy_batched:
        expected.append(seq[:seq.index(stop) + 1] if stop in seq else seq)
    assert len({len(e) for e in expected}) > 1  # some sequences stop, at different places or not at all
    assert phi4_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[stop, 10**6]) == expected


def test_streaming_callback_matches_and_reports_each_step(converted, prompts, greedy_batched):
    model, _ = converted
    stop = greedy_batched[0][5]
    columns = []
    out = phi4_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[stop], callback=columns.append)
    assert out == phi4_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[stop])
    for b, seq in enumerate(out):
        streamed = [c[b] for c in columns]
        assert streamed[:len(seq)] == seq and all(t is None for t in streamed[len(seq):])


def test_streaming_leaves_a_chat_session_as_without(converted, prompts):
    """A streamed turn (callback) gives the tokens of an unstreamed one and holds the same pages; a stop token ends
    the turn early, and the pages then hold the prompt and every generated token but the stop token."""
    model, _ = converted
    plain = chat_session.ChatSession(model, stop_tokens=[])
    plain_out = plain.generate(prompts[1], max_new_tokens=9)
    streamed = chat_session.ChatSession(model, stop_tokens=[])
    columns = []
    assert streamed.generate(prompts[1], max_new_tokens=9, callback=columns.append) == plain_out
    assert columns == [[t] for t in plain_out]
    assert streamed.cached_length == plain.cached_length == len(prompts[1]) + 8
    assert streamed._held.tokens == prompts[1] + plain_out[:-1]
    stop = plain_out[2]
    stopper = chat_session.ChatSession(model, stop_tokens=[stop])
    assert stopper.generate(prompts[1], max_new_tokens=9, callback=lambda column: None) == plain_out[:3]
    assert stopper.cached_length == len(prompts[1]) + 2
    for session in (plain, streamed, stopper):
        session.reset()
        assert session.cached_length == 0


def test_no_recompile_across_prompt_lengths_and_token_counts(converted):
    model, _ = converted
    rng = np.random.default_rng(1)
    phi4_jax.generate(model, [rng.integers(3, 311, 40).tolist()], max_new_tokens=5, stop_tokens=[])
    size = batching.engine_step._cache_size()
    for n, new in ((33, 9), (50, 12), (60, 4)):  # same buckets: prefill chunk 64, engine context and batch
        phi4_jax.generate(model, [rng.integers(3, 311, n).tolist()], max_new_tokens=new, stop_tokens=[])
    assert batching.engine_step._cache_size() == size


def test_context_limit(converted, prompts):
    model, _ = converted
    small = model_from_params(model.config.replace(max_position_embeddings=64), model.params)
    with pytest.raises(ContextLengthError, match="context window is 64"):
        phi4_jax.generate(small, [prompts[0], list(range(3, 67))], max_new_tokens=4, stop_tokens=[])
    out = phi4_jax.generate(small, [list(range(3, 63)), prompts[0]], max_new_tokens=10, stop_tokens=[])
    assert [len(o) for o in out] == [4, 10]  # the long prompt stops when the context is full


def test_bad_arguments_get_clear_errors(converted):
    model, _ = converted
    cases = [
        (dict(prompts=[]), "non-empty"),
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[1, 400]]), "outside the vocabulary"),
        (dict(prompts=[[1, 2.5]]), "integer token ids"),
        (dict(prompts="hello"), "list"),
        (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[1]], temperature=-1.0), "temperature"),
        (dict(prompts=[[1]], top_k=0), "top_k"),
        (dict(prompts=[[1]], top_p=1.5), "top_p"),
        (dict(prompts=[[1], [2]], seed=[1]), "seed"),
        (dict(prompts=[[1]], cache_dtype="int4"), "cache_dtype"),
    ]
    for kwargs, match in cases:
        kwargs.setdefault("max_new_tokens", 4)
        with pytest.raises(GenerationError, match=match):
            phi4_jax.generate(model, **kwargs)


def test_default_stop_tokens():
    assert engine.default_stop_tokens(phi4_jax.get_preset("phi4-14b")) == [100257, 100265]
    assert engine.default_stop_tokens(phi4_jax.get_preset("tiny")) == []


def test_sharded_generation_matches_and_shards_the_cache(converted, prompts, greedy_batched):
    """On a 2-device mesh (kv heads split over 'tensor'), the cache is sharded and tokens are unchanged."""
    from jax.sharding import Mesh, NamedSharding

    from phi4_jax.model import sharding
    from phi4_jax.model.decoder import logical_axes_tree

    model, _ = converted
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py simulates 8 CPU devices)")
    mesh = Mesh(np.array(jax.devices()[:2]), ("tensor",))
    rules = {"kv_heads": "tensor", "q_heads": "tensor", "mlp": "tensor"}
    params = jax.tree.map(lambda p, axes: jax.device_put(p, NamedSharding(mesh, sharding.logical_to_spec(axes, rules))),
                          model.params, logical_axes_tree(model.config),
                          is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x))
    sharded_model = model_from_params(model.config, params)
    out = phi4_jax.generate(sharded_model, prompts[:2], max_new_tokens=12, stop_tokens=[], mesh=mesh, rules=rules)
    assert out == [g[:12] for g in greedy_batched[:2]]
    with sharding.activation_sharding(mesh, rules):
        cache = jax.jit(lambda: kv_cache.init_cache(model.config, 2, 32))()
    expected = NamedSharding(mesh, sharding.logical_to_spec(kv_cache.CACHE_AXES, rules))
    assert cache.k.sharding.is_equivalent_to(expected, cache.k.ndim)
    assert cache.k.addressable_shards[0].data.shape[3] == model.config.num_kv_heads // 2


# ----------------------------------------------------------------------------- multi-turn: ChatSession / extend

def test_extended_cache_logits_equal_full_forward(converted):
    """`extend` by several tokens (padded, different counts per sequence, 0 included) after a prefill and
    after another extension gives model.forward's logits at each sequence's last token."""
    model, _ = converted
    params, config = model.params, model.config
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 311, 120).tolist() for _ in range(2)]
    lengths = [9, 30]
    tokens = np.zeros((2, 32), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = seqs[i][:n]
    prefill = jax.jit(kv_cache.prefill, static_argnums=(3, 4))
    extend = jax.jit(kv_cache.extend, static_argnums=(4,))
    full = np.asarray(forward(params, jnp.asarray(seqs), config))  # causal: position p sees seq[:p + 1] only
    cache, _ = prefill(params, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32), config, 128)
    for counts, width in (((23, 2), 32), ((0, 41), 64), ((17, 5), 32)):
        new = np.zeros((2, width), np.int32)
        for i, c in enumerate(counts):
            new[i, :c] = seqs[i][lengths[i]:lengths[i] + c]
        cache, logits = extend(params, cache, jnp.asarray(new), jnp.asarray(counts, jnp.int32), config)
        lengths = [n + c for n, c in zip(lengths, counts)]
        np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
        for i, c in enumerate(counts):
            if c:
                np.testing.assert_allclose(np.asarray(logits[i]), full[i, lengths[i] - 1], rtol=1e-4, atol=1e-4)


def test_chat_session_three_turns_equal_full_reprefill(converted):
    """Greedy turns through one ChatSession (cache kept, only new tokens prefilled, capacity grown) give
    exactly the tokens of `generate` re-prefilling the whole conversation each turn."""
    model, _ = converted
    rng = np.random.default_rng(4)
    session = chat_session.ChatSession(model, stop_tokens=[])
    conversation = rng.integers(3, 311, 20).tolist()
    for turn, (user, new) in enumerate(((0, 12), (9, 20), (35, 7))):
        conversation = conversation + rng.integers(3, 311, user).tolist()
        expected = phi4_jax.generate(model, [conversation], max_new_tokens=new, stop_tokens=[])[0]
        if turn == 2:  # extend() continues from session.tokens
            got = session.extend(conversation[len(session.tokens):], max_new_tokens=new)
        else:
            got = session.generate(conversation, max_new_tokens=new)
        assert got == expected, f"turn {turn} differs"
        if turn:
            assert not session.last_turn["rebuilt"]
            assert session.last_turn["reused"] == len(conversation) - user - 1  # all but the last answer token
            assert session.last_turn["prefilled"] == user + 1
        conversation = conversation + got
        assert session.tokens == conversation
        assert session.cached_length == len(conversation) - 1
        assert session._held.tokens == conversation[:-1]


def test_chat_session_rebuilds_after_trimming_and_on_divergence(converted):
    """A conversation whose start was dropped keeps only what still matches (the system prompt); one that diverges
    late is rewound to the common prefix. Both equal `generate`, and a stop token ends a turn like in `generate`."""
    model, _ = converted
    rng = np.random.default_rng(5)
    session = chat_session.ChatSession(model, stop_tokens=[])
    system, old, user = (rng.integers(3, 311, n).tolist() for n in (6, 40, 10))
    first = session.generate(system + old, max_new_tokens=10)
    trimmed = system + user                        # the old turn dropped: only the system part is reusable
    out = session.generate(trimmed, max_new_tokens=10)
    assert out == phi4_jax.generate(model, [trimmed], max_new_tokens=10, stop_tokens=[])[0]
    assert not session.last_turn["rebuilt"] and session.last_turn["reused"] == len(system)
    diverged = trimmed + out[:4] + [(out[4] % 300) + 3] + rng.integers(3, 311, 3).tolist()
    out2 = session.generate(diverged, max_new_tokens=10)
    assert out2 == phi4_jax.generate(model, [diverged], max_new_tokens=10, stop_tokens=[])[0]
    assert not session.last_turn["rebuilt"] and session.last_turn["reused"] == len(trimmed) + 4

    class Interrupted(Exception):
        pass

    def interrupt(column):
        raise Interrupted  # like Ctrl-C while an answer streams: the turn's pages are freed
    with pytest.raises(Interrupted):
        session.generate(diverged + out2, max_new_tokens=10, callback=interrupt)
    assert session.cached_length == 0 and session.tokens == []
    streamed = []
    assert session.generate(diverged, max_new_tokens=10, callback=lambda column: streamed.append(column[0])) == out2
    assert session.last_turn["rebuilt"] and streamed == out2
    stopper = chat_session.ChatSession(model, stop_tokens=[first[3]])
    assert stopper.generate(system + old, max_new_tokens=10) == first[:first.index(first[3]) + 1]
    with pytest.raises(ContextLengthError, match="max_context"):
        chat_session.ChatSession(model, max_context=16).generate(list(range(3, 19)), max_new_tokens=2)


def test_chat_session_no_recompile_across_turns(converted):
    """Turns of different lengths within the same prefill-chunk buckets (128 for the first turn, 16 for the
    others) reuse the engine's compiled programs."""
    model, _ = converted
    rng = np.random.default_rng(6)

    def conversation(first, turns):
        session = chat_session.ChatSession(model, stop_tokens=[])
        session.generate(rng.integers(3, 311, first).tolist(), max_new_tokens=6)
        for user, new in turns:
            session.extend(rng.integers(3, 311, user).tolist(), max_new_tokens=new)
            assert not session.last_turn["rebuilt"]

    conversation(70, [(10, 6), (10, 6)])
    size = batching.engine_step._cache_size()
    conversation(65, [(3, 9), (12, 4), (1, 12)])
    assert batching.engine_step._cache_size() == size
