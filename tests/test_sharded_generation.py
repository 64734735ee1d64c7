"""Generation on a mesh: `generate` and `ChatSession` with attention_impl="pallas_tpu" (interpret mode) on 4 of the
8 simulated CPU devices equal unsharded generation on the XLA path, token for token.

Both run on the serving engine (`batching.ContinuousBatchingEngine`, the one decode path): on a mesh every prefill
chunk and decode step attends through `kernels.sharded_paged_attention` (the Pallas paged kernel in shard_map) over
the sharded page pool (kv heads over `tensor`, the batch replicated: `batching.serving_rules`). One mesh,
fsdp=2 x tensor=2 (the parameters split over fsdp as training lays them out, the kv heads over tensor, the kernel
run by every fsdp replica), and one engine: `generate` and the `ChatSession` share the model's
`engine.shared_engine` (4 slots, 64 tokens), so the interpreted kernel is compiled for one set of program shapes
(the TPU interpreter's run time grows with the devices, hence 4, not 8; the engine alone on a tensor=2 mesh:
tests/test_sharded_paged.py). A tiny model (head_dim 128, as the TPU kernels' tiles need; fp32) with random
weights; prompts of different lengths under 64 tokens, 8 new tokens. The reference is the same weights on one
device with attention_impl="xla" (the path tests/test_generation.py checks against Hugging Face transformers).
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
CONTEXT = 64            # every call below fits it: the chat's second turn is 37 + 8 + 5 tokens + 8 new
MESH, DEVICES = "fsdp=2,tensor=2", 4
RULES = sharding.TRAINING_RULES   # parameters over fsdp, heads over tensor (the engine replicates the batch)


@pytest.fixture(scope="module")
def setup():
    if len(jax.devices()) < DEVICES:
        pytest.skip(f"needs {DEVICES} (simulated) devices: run under tests/conftest.py")
    params = init_params(CFG, jax.random.key(3))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    reference = model_from_params(CFG.replace(attention_impl="xla"), params)
    want = phi4_jax.generate(reference, prompts, max_new_tokens=NEW, stop_tokens=[])
    assert all(len(w) == NEW for w in want)
    mesh = sharding.build_mesh(MESH, devices=jax.devices()[:DEVICES])
    config = CFG.replace(attention_impl="pallas_tpu", kernel_interpret=interpret_for("tpu"))
    shardings = sharding.tree_shardings(mesh, logical_axes_tree(config), RULES)
    kernel_model = model_from_params(config, jax.device_put(params, shardings))
    return prompts, reference, want, mesh, kernel_model


@pytest.fixture(scope="module")
def kernel_calls():
    """Counts the sharded paged attention calls traced in this module (the engine is shared, so its programs are
    traced once, by whichever test runs first): a test proves it took the engine's path, with the kernel in
    shard_map."""
    import kernels

    calls = []
    original = kernels.sharded_paged_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "sharded_paged_attention", counted)
        yield calls


def test_greedy_generation_on_a_mesh_with_pallas_kernels_matches_xla(setup, kernel_calls):
    prompts, _, want, mesh, kernel_model = setup
    got = phi4_jax.generate(kernel_model, prompts, max_new_tokens=NEW, stop_tokens=[], mesh=mesh, rules=RULES)
    assert got == want
    assert kernel_calls, "the generation did not attend through kernels.sharded_paged_attention"


def test_chat_session_turns_on_a_mesh_with_pallas_kernels(setup, kernel_calls):
    """Two turns of one ChatSession on the same mesh and engine (a batch of one): the second turn resumes from the
    held pages and prefills the user's tokens as one chunk (several new queries per sequence against the pages).
    Each equals unsharded XLA `generate` re-prefilling the whole conversation."""
    prompts, reference, want, mesh, kernel_model = setup
    session = chat_session.ChatSession(kernel_model, stop_tokens=[], max_context=CONTEXT, mesh=mesh, rules=RULES)
    conversation = list(prompts[0])
    for turn, user in enumerate(([], prompts[3])):
        conversation = conversation + user
        expected = want[0] if turn == 0 else phi4_jax.generate(reference, [conversation], max_new_tokens=NEW,
                                                               stop_tokens=[])[0]
        got = session.generate(conversation, max_new_tokens=NEW)
        assert got == expected, f"turn {turn} differs"
        conversation = conversation + got
    assert not session.last_turn["rebuilt"]     # the second turn resumed from the held pages
    assert kernel_calls, "the engine did not attend through kernels.sharded_paged_attention"
    assert session._engine.pages.k.sharding.spec[3] == "tensor"    # the pool's kv heads split over the mesh
    session.reset()
