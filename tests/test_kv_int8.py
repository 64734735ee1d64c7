"""The int8 KV cache: its number format (`kv_quant.quantize_kv`) against a NumPy statement of the definition;
`kernels.paged_attention` over int8 pages (XLA reference and the Pallas TPU kernel, interpreted) against the
float64 NumPy oracle of attention over the dequantized cache; the engine with `cache_dtype="int8"` against
transformers (logits error within a justified bound, greedy agreement); memory accounting; bad values refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracle
import pytest
import torch
from hf_models import convert_tiny_phi3, hf_logits
from kernel_mode import interpret_for

import phi4_jax
from kernels.paged_attention import paged_attention
from phi4_jax.inference.batching import ContinuousBatchingEngine, GenerationRequest
from phi4_jax.inference.chat_session import ChatSession
from phi4_jax.inference.errors import GenerationError
from phi4_jax.inference.kv_quant import quantize_kv
from phi4_jax.inference.paged_cache import init_pages, page_bytes, paged_extend
from phi4_jax.model.config import get_preset

INTERPRET = interpret_for("tpu")


def np_quantize(x):
    """The definition in NumPy float32: scale = max|x| / 127 over the last axis, code = round(x / scale)."""
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(axis=-1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return codes, scale.astype(np.float32)


def test_quantize_matches_numpy_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 4, 128)).astype(np.float32) * rng.uniform(0.01, 50, (3, 7, 4, 1))
    x[1, 2, 3] = 0.0                                                # an all-zero vector: scale 0, codes 0
    x[0, 0, 0, 5] = -1e4                                            # an outlier coarsens only its own vector
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
        codes, scale = jax.jit(quantize_kv)(jnp.asarray(x, dtype))
        want_codes, want_scale = np_quantize(xd)
        assert codes.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == x.shape[:-1]
        # Equal codes, except that a value within float32 rounding of a .5 tie may round either way (XLA may
        # divide by 127 as a multiply by 1/127, one ulp off NumPy's scale).
        ratio = xd / np.where(want_scale > 0, want_scale, 1)[..., None]
        near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-4
        diff = np.abs(np.asarray(codes, np.int32) - want_codes)
        assert np.all(diff[~near_tie] == 0) and np.all(diff <= 1), np.argwhere(diff[~near_tie])
        np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=2.5e-7)   # XLA may use x * (1/127)
        assert np.all(np.abs(want_codes).max(axis=-1)[want_scale > 0] == 127)
        err = np.abs(np.asarray(codes, np.float64) * np.asarray(scale, np.float64)[..., None] - xd)
        assert np.all(err <= np.asarray(scale, np.float64)[..., None] * (0.5 + 1e-4))
    assert not np.any(np.asarray(codes)[1, 2, 3]) and float(scale[1, 2, 3]) == 0.0


def _int8_case(seed, t, d, page):
    """Two layers of int8 pages scattered through a pool, GQA 6:2, ragged lengths; keys/values of very different
    magnitude per token and head (so a scale applied to the wrong column or head shows)."""
    rng = np.random.default_rng(seed)
    layers, num_pages, hkv, hq, width = 2, 23, 2, 6, 5
    shape = (layers, num_pages, page, hkv, d)
    k = rng.standard_normal(shape) * rng.uniform(0.05, 4.0, shape[:-1] + (1,))
    v = rng.standard_normal(shape) * rng.uniform(0.05, 4.0, shape[:-1] + (1,))
    (k8, ks), (v8, vs) = np_quantize(k), np_quantize(v)             # scales [L, P, S, H]
    lengths = np.array([t, page + 3, width * page, 2 * page + 5], np.int32)
    tables = rng.permutation(np.arange(1, num_pages))[:4 * width].reshape(4, width).astype(np.int32)
    q = rng.standard_normal((4, t, hq, d)).astype(np.float32)
    to_pool = lambda s: np.ascontiguousarray(np.swapaxes(s, -1, -2))   # [L, P, H, S]  # noqa: E731
    return q, k8, v8, to_pool(ks), to_pool(vs), tables, lengths


def _oracle(q, k8, v8, ks, vs, tables, lengths, layer):
    """float64 attention over the dequantized cache (code * scale), pages laid end to end."""
    b, w = tables.shape
    page = k8.shape[2]

    def seq(codes, scales):   # codes [L, P, S, H, D], scales [L, P, H, S]
        deq = codes[layer].astype(np.float64) * np.swapaxes(scales[layer], -1, -2)[..., None].astype(np.float64)
        return deq[tables].reshape(b, w * page, *codes.shape[3:])

    t = q.shape[1]
    return numpy_oracle.attention(q, seq(k8, ks), seq(v8, vs), causal=True, q_offset=lengths - t, kv_len=lengths)[0]


@pytest.mark.parametrize("t", [1, 5])
def test_int8_reference_matches_float64_oracle(t):
    q, k8, v8, ks, vs, tables, lengths = _int8_case(t, t, 8, 4)
    run = jax.jit(lambda q, k, v, ks, vs, tab, n, layer: paged_attention(q, k, v, tab, n, k_scales=ks, v_scales=vs,
                                                                          layer=layer, implementation="xla"))
    for layer in range(2):
        want = _oracle(q, k8, v8, ks, vs, tables, lengths, layer)
        got = run(q, k8, v8, ks, vs, tables, lengths, layer)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    one_layer = paged_attention(q, k8[1], v8[1], tables, lengths, k_scales=ks[1], v_scales=vs[1])
    np.testing.assert_allclose(np.asarray(one_layer), _oracle(q, k8, v8, ks, vs, tables, lengths, 1), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("t", [1, 5])
def test_int8_pallas_kernel_matches_float64_oracle(t):
    """head_dim 128 and 8-row pages, as on a TPU; the stacked pool read at a traced layer index."""
    q, k8, v8, ks, vs, tables, lengths = _int8_case(10 + t, t, 128, 8)
    run = jax.jit(lambda q, k, v, ks, vs, tab, n, layer: paged_attention(
        q, k, v, tab, n, k_scales=ks, v_scales=vs, layer=layer, implementation="pallas", interpret=INTERPRET))
    want = _oracle(q, k8, v8, ks, vs, tables, lengths, 1)
    np.testing.assert_allclose(np.asarray(run(q, k8, v8, ks, vs, tables, lengths, 1)), want, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- the model and the engine

PAGE = 16


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst, hf_model = convert_tiny_phi3(tmp_path_factory.mktemp("kvint8"), seed=7)
    return phi4_jax.load_model(dst, dtype=jnp.float32), hf_model


def _paged_logits(model, seq, n_prefill, chunk, cache_dtype):
    """float32 logits [n, vocab] from `paged_extend` over one sequence: prefill chunks (logits at each chunk's last
    token), then one token per step (logits at each): the serving engine's math, with its page pool."""
    n_pages = -(-len(seq) // PAGE) + 1
    pages = init_pages(model.config, n_pages, PAGE, cache_dtype)
    table = np.arange(1, n_pages + 1, dtype=np.int32)[None] % n_pages       # page 0 (null) unused
    step = jax.jit(paged_extend, static_argnames="config")
    out, positions = [], []
    for start, size in [(s, chunk) for s in range(0, n_prefill, chunk)] + [(p, 1) for p in range(n_prefill, len(seq))]:
        tokens = np.asarray([seq[start:start + size]], np.int32)
        pages, logits = step(model.params, pages, tokens, np.array([start], np.int32), np.array([size], np.int32),
                             table, config=model.config)
        out.append(np.asarray(logits[0]))
        positions.append(start + size - 1)
    return np.stack(out), positions


@pytest.fixture(scope="module")
def logits_errors(converted):
    """Max |logit - transformers fp32 logit| of the paged pool in float32, bfloat16 and int8, over a 520-token
    sequence (2 prefill chunks of 256, then 8 decode steps)."""
    model, hf_model = converted
    seq = np.random.default_rng(3).integers(3, 311, 520).tolist()
    want = hf_logits(hf_model, np.asarray([seq]))[0]
    errors = {}
    for dtype in ("float32", "bfloat16", "int8"):
        got, positions = _paged_logits(model, seq, 512, 256, dtype)
        errors[dtype] = float(np.abs(got - want[positions]).max())
    return errors


def test_int8_pool_logits_vs_transformers(logits_errors):
    """int8 KV logits stay within a bound derived from the format, relative to the bf16 pool (the precision the
    engine serves in by default), measured in the same run.

    A cached element's int8 rounding error is at most scale / 2 = max|x| / 254, uniform in [-scale/2, scale/2],
    so its RMS is max|x| / (254 sqrt 3); bf16's is about |x| 2^-9 / sqrt 3. For Gaussian-like head vectors of 12
    entries (max|x| ~ 2 sigma, RMS |x| = sigma) that is ~4x bf16's cache error, while the bf16 pool also rounds
    the queries and the probabilities (the int8 path keeps them in the compute dtype). So the int8 pool's max logits
    error must be at most 4x the bf16 pool's; it must also be far above the float32 pool's (the int8 path really
    quantizes), which itself matches transformers (the harness is right)."""
    errors = logits_errors
    assert errors["float32"] < 1e-4, errors
    assert errors["int8"] > 10 * errors["float32"], errors
    assert errors["int8"] <= 4 * errors["bfloat16"], errors


def greedy_agreement(hf_model, prompts, answers, max_logit_error):
    """How many answers equal transformers' greedy continuation; an answer may leave it only at a near tie (its
    token's transformers logit within 2 x max_logit_error of the top one: the most two logits can move by)."""
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    agreed = 0
    for prompt, got in zip(prompts, answers):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=len(got), do_sample=False)
        want = want[0, len(prompt):].tolist()
        if got == want:
            agreed += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        row = hf_logits(hf_model, np.asarray([prompt + want[:i]]))[0, -1]
        assert row[want[i]] - row[got[i]] <= 2 * max_logit_error, (i, got, want)
    return agreed


def test_engine_int8_greedy_agrees_with_transformers(converted, logits_errors):
    """The engine with cache_dtype="int8" (chunked prefill, continuous batching of three requests) generates
    transformers' greedy tokens; it may leave them only at a near tie, where transformers' top two logits are
    closer than twice the int8 pool's measured max logits error (the most two logits can move by)."""
    model, hf_model = converted
    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, 311, n).tolist() for n in (9, 150, 300)]
    eng = ContinuousBatchingEngine(model, max_batch=3, max_context=400, page_size=PAGE, prefill_chunk=64,
                                   cache_dtype="int8").start()
    try:
        assert eng.pages.k.dtype == jnp.int8 and eng.pages.k_scale.dtype == jnp.float32
        streams = [eng.submit(GenerationRequest(p, 16)) for p in prompts]
        answers = [[e.token_id for e in s] for s in streams]
    finally:
        eng.shutdown()
    assert greedy_agreement(hf_model, prompts, answers, logits_errors["int8"]) >= 2, answers


def test_int8_pool_memory_accounting(converted):
    """page_bytes counts the int8 pages and their float32 scales; the engine's pool really takes that many bytes,
    and at phi-4's head_dim 128 a byte budget holds 256/132 = 1.94x the pages of bf16 (3.9x float32)."""
    model = converted[0]
    c = model.config
    assert page_bytes(c, 8, "int8") == 2 * c.num_layers * 8 * c.num_kv_heads * (c.head_dim + 4)
    budget = 40 * page_bytes(c, 8, "int8")
    eng = ContinuousBatchingEngine(model, max_batch=1, max_context=64, page_size=8, kv_cache_bytes=budget,
                                   cache_dtype="int8")
    assert eng.stats()["pages_total"] == 40 - 1
    assert sum(x.nbytes for x in jax.tree.leaves(eng.pages)) == budget
    phi4 = get_preset("phi4-14b")
    gib = 2**30
    bf16, int8, fp32 = (gib // page_bytes(phi4, 16, dtype) for dtype in ("bfloat16", "int8", "float32"))
    assert int8 == gib // (2 * 40 * 16 * 10 * 132) and 1.93 < int8 / bf16 < 1.95 and 3.8 < int8 / fp32 < 3.9


def test_bad_cache_dtype_is_refused_in_one_line(converted):
    for make in (lambda: ContinuousBatchingEngine(converted[0], max_context=64, cache_dtype="int4"),
                 lambda: phi4_jax.generate(converted[0], [[5, 6]], max_new_tokens=1, cache_dtype="int4")):
        with pytest.raises(GenerationError) as info:
            make()
        assert str(info.value) == "cache_dtype must be one of float32, bfloat16, float16, int8, got 'int4'"


def test_generate_and_chat_session_with_int8_cache(converted, logits_errors):
    """`generate` and a two-turn `ChatSession` (the second turn resumes from its held pages) on the engine's int8
    pages: greedy answers agree with transformers as the engine's do."""
    model, hf_model = converted
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 311, n).tolist() for n in (40, 200)]
    answers = phi4_jax.generate(model, prompts, max_new_tokens=12, stop_tokens=[], cache_dtype="int8")
    session = ChatSession(model, stop_tokens=[], cache_dtype="int8")
    first = session.generate(prompts[0], max_new_tokens=8)
    turn = rng.integers(3, 311, 30).tolist()
    second = session.extend(turn, max_new_tokens=12)
    assert not session.last_turn["rebuilt"] and session._engine.pages.k.dtype == jnp.int8
    conversation = [prompts[0], prompts[0] + first + turn]
    assert greedy_agreement(hf_model, prompts + conversation, answers + [first, second],
                            logits_errors["int8"]) >= 3


def test_cli_kv_cache_dtype_flag(converted, capsys):
    """`--kv-cache-dtype` of `python -m phi4_jax.chat` reaches the ChatSession; `python -m phi4_jax.serve` takes
    it too; a bad value is a one-line usage error naming the choices."""
    from phi4_jax.cli import chat, serve

    args = chat.parse_args(["--checkpoint", "x", "--kv-cache-dtype", "int8"])
    session = chat.new_session(converted[0], phi4_jax.Tokenizer(), args, 64)
    assert session._cache_dtype == "int8"
    assert serve.parse_args(["--checkpoint", "x", "--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    for parse in (chat.parse_args, serve.parse_args):
        with pytest.raises(SystemExit) as info:
            parse(["--checkpoint", "x", "--kv-cache-dtype", "int4"])
        assert info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--kv-cache-dtype: invalid choice: 'int4'" in error and "int8" in error, error


def test_int8_engine_on_a_mesh_equals_single_device():
    """On a tensor=2 mesh of simulated CPU devices the int8 pages and their scales are split over kv heads, and
    greedy answers equal the single-device int8 engine's (itself checked against transformers above)."""
    from flax import nnx

    from phi4_jax.inference.batching import serving_rules
    from phi4_jax.model import sharding
    from phi4_jax.model.decoder import Phi4ForCausalLM, logical_axes_tree, model_from_params

    config = get_preset("tiny", max_position_embeddings=128)
    model = Phi4ForCausalLM(config, rngs=nnx.Rngs(4))
    mesh = sharding.build_mesh("tensor=2")
    params = jax.device_put(model.params, sharding.tree_shardings(mesh, logical_axes_tree(config), serving_rules()))
    prompts = [list(range(3, 40)), list(range(100, 121))]
    answers = []
    for eng_model, eng_mesh in ((model, None), (model_from_params(config, params), mesh)):
        eng = ContinuousBatchingEngine(eng_model, max_batch=2, page_size=16, prefill_chunk=16, mesh=eng_mesh,
                                       cache_dtype="int8").start()
        try:
            if eng_mesh is not None:
                assert eng.pages.k.sharding.spec[3] == "tensor" and eng.pages.k_scale.sharding.spec[2] == "tensor"
            streams = [eng.submit(GenerationRequest(p, 6)) for p in prompts]
            answers.append([[e.token_id for e in s] for s in streams])
        finally:
            eng.shutdown()
    assert answers[0] == answers[1]
