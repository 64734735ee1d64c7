"""Paged attention on a mesh: the Pallas paged kernels inside `jax.shard_map` (`kernels.sharded_paged_attention`).

- The serving engine on a tensor=2 mesh of simulated CPU devices (tests/conftest.py) with attention_impl
  "pallas_tpu" (the Mosaic TPU paged kernel, TPU interpreter): the page pool is split over kv heads as
  `serving_rules` lays it out, each device runs the kernel on its heads, and the greedy tokens equal an unsharded
  greedy loop over the plain forward pass (XLA attention, no cache; the forward is checked against transformers
  in tests/test_model.py).
- The Triton GPU kernel (Pallas interpreter) through the same wrapper on a data=2 x tensor=2 mesh (batch and
  heads split) against the float64 NumPy oracle.
- Which kernel `paged_cache.paged_extend` calls, with and without a mesh, for each attention_impl (its jaxpr).
"""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracle
import pytest
from flax import nnx

import kernels
from phi4_jax.inference import paged_cache
from phi4_jax.inference.batching import ContinuousBatchingEngine, GenerationRequest, serving_rules
from phi4_jax.model import sharding
from phi4_jax.model.config import get_preset
from phi4_jax.model.decoder import Phi4ForCausalLM, forward, logical_axes_tree, model_from_params

CONFIG = get_preset("tiny", max_position_embeddings=32)
PROMPTS = [list(range(100, 121)), list(range(50, 53))]   # 21 tokens: two prefill chunks of 16
NEW = 4


def _need(n):
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} (simulated) devices: run under tests/conftest.py")


def _greedy_by_forward(params, prompts, n):
    """Greedy continuations from the full forward pass on right-padded rows (causal: padding is never seen)."""
    step = jax.jit(lambda ids: forward(params, ids, CONFIG.replace(attention_impl="xla")))
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        ids = np.zeros((len(seqs), CONFIG.max_position_embeddings), np.int32)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        logits = np.asarray(step(ids))
        for i, s in enumerate(seqs):
            s.append(int(logits[i, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


def test_engine_with_the_pallas_tpu_paged_kernel_on_a_tensor_mesh_equals_unsharded(monkeypatch):
    _need(2)
    params = Phi4ForCausalLM(CONFIG, rngs=nnx.Rngs(4)).params
    want = _greedy_by_forward(params, PROMPTS, NEW)
    mesh = sharding.build_mesh("tensor=2", devices=jax.devices()[:2])
    config = CONFIG.replace(attention_impl="pallas_tpu", kernel_interpret=True)
    sharded = jax.device_put(params, sharding.tree_shardings(mesh, logical_axes_tree(config), serving_rules()))
    wrapper = _counting(monkeypatch, kernels, "sharded_paged_attention")
    kernel = _counting(monkeypatch, importlib.import_module("kernels.paged_attention"), "paged_attention_pallas")
    eng = ContinuousBatchingEngine(model_from_params(config, sharded), max_batch=2, page_size=8, prefill_chunk=16,
                                   mesh=mesh).start()
    try:
        assert eng.pages.k.sharding.spec[3] == "tensor"          # the pool is split over kv heads
        streams = [eng.submit(GenerationRequest(p, NEW)) for p in PROMPTS]
        assert [[e.token_id for e in s] for s in streams] == want
    finally:
        eng.shutdown()
    assert wrapper and kernel, (wrapper, kernel)                # the sharded wrapper ran the Pallas kernel


def test_sharded_gpu_paged_kernel_matches_float64_oracle():
    """Batch over `data`, q and kv heads over `tensor` (GQA 2 q heads per kv head), the pool over kv heads only."""
    _need(4)
    rng = np.random.default_rng(5)
    b, t, hq, hkv, d, page, width, num_pages = 4, 2, 8, 4, 64, 8, 6, 30
    k_pages, v_pages = (rng.standard_normal((2, num_pages, page, hkv, d)).astype(np.float32) for _ in range(2))
    tables = rng.permutation(np.arange(1, num_pages))[:b * width].reshape(b, width).astype(np.int32)
    lengths = np.array([2, 48, 19, 33], np.int32)
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    run = jax.jit(lambda *a: kernels.sharded_paged_attention(
        *a, layer=1, mesh=mesh, batch_axes="data", q_head_axes="tensor", kv_head_axes="tensor",
        implementation="pallas_gpu", interpret=True))
    got = np.asarray(run(q, k_pages, v_pages, tables, lengths))
    k_seq = k_pages[1][tables].reshape(b, width * page, hkv, d)
    v_seq = v_pages[1][tables].reshape(b, width * page, hkv, d)
    want = numpy_oracle.attention(q, k_seq, v_seq, causal=True, q_offset=lengths - t, kv_len=lengths)[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("attention_impl, kernel_name", [("pallas_tpu", "paged_attention"),
                                                         ("pallas_gpu", "paged_attention_gpu"), ("xla", None)])
def test_paged_extend_calls_the_kernel_of_its_attention_impl(attention_impl, kernel_name):
    """Traced only (no compile): the Pallas call named after the kernel, inside a shard_map on a mesh; the XLA
    reference (a plain gather, no Pallas call, no shard_map) for "xla"."""
    _need(2)
    config = CONFIG.replace(attention_impl=attention_impl, kernel_interpret=True)
    params = jax.eval_shape(lambda: Phi4ForCausalLM(CONFIG, rngs=nnx.Rngs(0)).params)
    pages = jax.eval_shape(lambda: paged_cache.init_pages(config, 9, 8))
    ints = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    args = (params, pages, ints(2, 1), ints(2), ints(2), ints(2, 4))
    mesh = sharding.build_mesh("tensor=2", devices=jax.devices()[:2])
    for on_mesh in (False, True):
        def extend(*a):
            if not on_mesh:
                return paged_cache.paged_extend(*a, config)
            with sharding.activation_sharding(mesh, serving_rules()):
                return paged_cache.paged_extend(*a, config)
        text = str(jax.make_jaxpr(extend)(*args))
        names = set(re.findall(r"name=[\"']?(paged_attention\w*)", text))
        assert names == ({kernel_name} if kernel_name else set()), (attention_impl, on_mesh, names)
        assert ("shard_map" in text) == (on_mesh and kernel_name is not None), (attention_impl, on_mesh)


def test_a_pool_split_over_pages_is_refused():
    mesh = sharding.build_mesh("tensor=2", devices=jax.devices()[:2])
    rules = {**serving_rules(), "kv_pages": "tensor", "kv_heads": None}
    with sharding.activation_sharding(mesh, rules), pytest.raises(sharding.MeshError, match="kv_pages over 'tensor'"):
        sharding.sharded_paged_args("pallas", paged_cache.PAGE_AXES)


def test_a_mesh_that_cannot_split_the_kv_heads_is_refused():
    _need(2)
    mesh = sharding.build_mesh("tensor=2", devices=jax.devices()[:2])
    q, pages = jnp.zeros((2, 1, 6, 64)), jnp.zeros((5, 8, 3, 64))
    with pytest.raises(kernels.AttentionConfigError, match="does not divide kv heads=3"):
        kernels.sharded_paged_attention(q, pages, pages, jnp.ones((2, 2), jnp.int32), jnp.ones((2,), jnp.int32),
                                        mesh=mesh, q_head_axes="tensor", kv_head_axes="tensor",
                                        implementation="pallas_gpu", interpret=True)
