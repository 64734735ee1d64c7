"""The model's loss and gradients on a mesh (Pallas kernels in shard_map, attention split over `context`) equal the
single-device XLA path.

A tiny model (hidden 64, 2 layers, 4 q / 2 kv heads, head_dim 128 as the fused-RoPE TPU kernel needs, seq 128) on
packed documents that cross the context shards' boundaries, under `sharding.activation_sharding` with the training
rules, so `phi4_jax.model.self_attention` takes its sharded path. fp32 compute; loss to 1e-5 relative, every
gradient to 1e-4 of its largest entry. One jit (one compile) per mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_mode import interpret_for

from kernels import mosaic_gpu_interpret
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.model.decoder import logical_axes_tree
from phi4_jax.train.loss import loss_sum_and_count
from phi4_jax.train.step import init_params

CFG = Phi4Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=128, rope_theta=10000.0, max_position_embeddings=1024, param_dtype="float32",
                 compute_dtype="float32", remat_policy="none")
B, S = 8, 128


def _need_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices: run under tests/conftest.py")


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    seg = np.ones((B, S), np.int32)
    seg[:, 45:] = 2                    # crosses the 2-shard boundary at 64
    seg[::2, 100:] = 3
    seg[3, 120:] = 0
    starts = {1: 0, 2: 45, 3: 100}
    pos = np.stack([[j - starts.get(int(s), j) if s else 0 for j, s in enumerate(row)] for row in seg])
    batch = {"input_ids": rng.integers(0, CFG.vocab_size, (B, S)).astype(np.int32), "segment_ids": seg,
             "positions": pos.astype(np.int32)}
    params = init_params(CFG, jax.random.key(0))
    want = _loss_and_grads(CFG.replace(attention_impl="xla"), params, batch, mesh=None)
    return params, batch, want


def _loss_and_grads(config, params, batch, mesh):
    def loss(p, b):
        total, count = loss_sum_and_count(p, b, config, 64)
        return total / count

    if mesh is None:
        return jax.jit(jax.value_and_grad(loss))(params, batch)
    rules = sharding.TRAINING_RULES
    param_sh = sharding.tree_shardings(mesh, logical_axes_tree(config), rules)
    batch_sh = sharding.named_sharding(mesh, ("batch", "seq"), rules)

    def sharded(p, b):
        with sharding.activation_sharding(mesh, rules):
            return jax.value_and_grad(loss)(p, b)

    params = jax.device_put(params, param_sh)
    batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    return jax.jit(sharded)(params, batch)


def _compare(got, want):
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    flat_want = jax.tree_util.tree_leaves_with_path(want[1])
    for (path, w), g in zip(flat_want, jax.tree.leaves(got[1])):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-4 * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_spec, impl", [
    ("data=2,tensor=2,context=2", "pallas_tpu"),
    ("fsdp=4,tensor=2", "pallas_tpu"),
    ("fsdp=8", "pallas_tpu"),
    ("fsdp=2,context=4", "xla"),
])
def test_model_loss_and_grads_on_mesh_match_single_device(problem, mesh_spec, impl):
    _need_8()
    params, batch, want = problem
    mesh = sharding.build_mesh(mesh_spec)
    config = CFG.replace(attention_impl=impl, kernel_interpret=interpret_for("tpu") if impl == "pallas_tpu" else False)
    _compare(_loss_and_grads(config, params, batch, mesh), want)


@pytest.mark.skipif(interpret_for("gpu") and not mosaic_gpu_interpret.is_available(),
                    reason="this JAX has no Mosaic GPU interpret mode")
def test_model_on_pallas_gpu_with_tensor_and_context(problem):
    _need_8()
    params, batch, want = problem
    mesh = sharding.build_mesh("data=2,tensor=2,context=2")
    config = CFG.replace(attention_impl="pallas_gpu", kernel_interpret=interpret_for("gpu"))
    _compare(_loss_and_grads(config, params, batch, mesh), want)


def test_context_axis_really_splits_attention(problem):
    # The traced step runs attention in shard_map and all-gathers K/V over `context` (no replicated attention).
    _need_8()
    params, batch, _ = problem
    mesh = sharding.build_mesh("data=2,tensor=2,context=2")
    config = CFG.replace(attention_impl="xla")

    def loss(p, b):
        with sharding.activation_sharding(mesh, sharding.TRAINING_RULES):
            return loss_sum_and_count(p, b, config, 64)[0]

    text = str(jax.make_jaxpr(jax.grad(loss))(params, batch))
    assert "shard_map" in text and "all_gather" in text and "reduce_scatter" in text
