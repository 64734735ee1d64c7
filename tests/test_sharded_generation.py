"""Generation on a mesh: `generate` and `ChatSession` with attention_impl="pallas_tpu" (interpret mode) on 8
simulated CPU devices equal unsharded generation on the XLA path, token for token.

Both run on the serving engine (`batching.ContinuousBatchingEngine`, the one decode path): on a mesh every prefill
chunk and decode step attends through `kernels.sharded_paged_attention` (the Pallas paged kernel in shard_map) over
the sharded page pool (kv heads over `tensor`, the batch replicated: `batching.serving_rules`). A tiny model (head_dim 128, as the TPU kernels' tiles need; fp32) with random weights; prompts of
different lengths under 64 tokens, 8 new tokens. The reference is the same weights on one device with
attention_impl="xla" (the path tests/test_generation.py checks against Hugging Face transformers).
"""

import jax
import numpy as np
import pytest
from kernel_mode import interpret_for

import phi4_jax
from phi4_jax.inference import chat_session
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.model.decoder import logical_axes_tree, model_from_params
from phi4_jax.train.step import init_params

CFG = Phi4Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=128, rope_theta=10000.0, max_position_embeddings=256, param_dtype="float32",
                 compute_dtype="float32", remat_policy="none")
PROMPT_LENGTHS = (37, 12, 50, 5)
NEW = 8


def _need_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices: run under tests/conftest.py")


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.key(3))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    reference = model_from_params(CFG.replace(attention_impl="xla"), params)
    want = phi4_jax.generate(reference, prompts, max_new_tokens=NEW, stop_tokens=[])
    assert all(len(w) == NEW for w in want)
    return params, prompts, reference, want


def _kernel_model_on(mesh, params, rules):
    config = CFG.replace(attention_impl="pallas_tpu", kernel_interpret=interpret_for("tpu"))
    shardings = sharding.tree_shardings(mesh, logical_axes_tree(config), rules)
    return model_from_params(config, jax.device_put(params, shardings))


def _counting_kernel_calls(monkeypatch):
    """Counts the sharded paged attention calls the generation traces (so the test proves it took the engine's
    path, with the kernel in shard_map)."""
    import kernels

    calls = {"sharded_paged_attention": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.mark.parametrize("mesh_spec, n_devices", [("fsdp=4,tensor=2", 8), ("data=1,fsdp=1,tensor=2", 2)])
def test_greedy_generation_on_a_mesh_with_pallas_kernels_matches_xla(setup, mesh_spec, n_devices, monkeypatch):
    _need_8()
    params, prompts, _, want = setup
    mesh = sharding.build_mesh(mesh_spec, devices=jax.devices()[:n_devices])
    rules = sharding.TRAINING_RULES          # batch over (data, fsdp), heads over tensor
    calls = _counting_kernel_calls(monkeypatch)
    got = phi4_jax.generate(_kernel_model_on(mesh, params, rules), prompts, max_new_tokens=NEW, stop_tokens=[],
                            mesh=mesh, rules=rules)
    assert got == want
    assert calls["sharded_paged_attention"] > 0, calls


def test_chat_session_turns_on_a_mesh_with_pallas_kernels(setup, monkeypatch):
    """Two turns of one ChatSession on a tensor=2 mesh (batch of one, replicated): the second turn resumes from the
    held pages and prefills the user's tokens as one chunk (several new queries per sequence against the pages).
    Each equals unsharded XLA `generate` re-prefilling the whole conversation."""
    _need_8()
    params, prompts, reference, _ = setup
    mesh = sharding.build_mesh("data=1,fsdp=1,tensor=2", devices=jax.devices()[:2])
    rules = sharding.TRAINING_RULES
    calls = _counting_kernel_calls(monkeypatch)
    session = chat_session.ChatSession(_kernel_model_on(mesh, params, rules), stop_tokens=[], mesh=mesh, rules=rules)
    conversation = list(prompts[0])
    for turn, user in enumerate(([], prompts[1])):
        conversation = conversation + user
        expected = phi4_jax.generate(reference, [conversation], max_new_tokens=NEW, stop_tokens=[])[0]
        got = session.generate(conversation, max_new_tokens=NEW)
        assert got == expected, f"turn {turn} differs"
        conversation = conversation + got
    assert not session.last_turn["rebuilt"]     # the second turn resumed from the held pages
    assert calls["sharded_paged_attention"] > 0, calls
