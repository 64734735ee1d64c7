"""Train step pieces on one device: chunked loss, packing, gradient accumulation, schedule, 16K step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax.model import sharding
from phi4_jax.model.config import get_preset
from phi4_jax.train.loss import chunked_cross_entropy_sum, loss_sum_and_count, next_token_targets
from phi4_jax.model.decoder import forward, hidden_states
from phi4_jax.train.optimizer import learning_rate_schedule, make_optimizer
from phi4_jax.train.config import OptimizerConfig
from phi4_jax.train.step import create_train_state, init_params, make_train_step, train_state_shardings
from phi4_jax.train.mfu import training_flops_per_token

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(1))


def _single_mesh():
    return sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])


def test_next_token_targets_respect_segments():
    ids = jnp.array([[5, 6, 7, 8, 9, 3]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    targets, w = next_token_targets(ids, seg)
    np.testing.assert_array_equal(targets[0, :5], [6, 7, 8, 9, 3])
    # 7 -> 8 crosses a document boundary, 9 -> pad and the pad itself are not trained on
    np.testing.assert_array_equal(w[0], [1, 1, 0, 1, 0, 0])


def test_chunked_loss_equals_full_logits(params):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 64)), jnp.int32)
    seg = jnp.ones_like(ids)
    h = hidden_states(params, ids, CFG)
    targets, w = next_token_targets(ids, seg)
    logits = forward(params, ids, CFG)
    logp = jax.nn.log_softmax(logits, -1)
    want = -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * w)
    for chunk in (64, 16, 8):
        got = chunked_cross_entropy_sum(params, h, targets, w, CFG, chunk)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # gradients too (the chunk body is rematerialized)
    g_full = jax.grad(lambda hh: -jnp.sum(jnp.take_along_axis(
        jax.nn.log_softmax(hh @ params["lm_head"], -1), targets[..., None], -1)[..., 0] * w))(h)
    g_chunk = jax.grad(lambda hh: chunked_cross_entropy_sum(params, hh, targets, w, CFG, 16))(h)
    np.testing.assert_allclose(g_chunk, g_full, atol=1e-6)


def test_packed_loss_equals_per_document_losses(params):
    rng = np.random.default_rng(1)
    lengths = [20, 13, 17]
    docs = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
    s = 64
    ids = np.zeros((1, s), np.int32)
    seg = np.zeros((1, s), np.int32)
    pos = np.zeros((1, s), np.int32)
    at = 0
    for i, d in enumerate(docs):
        ids[0, at:at + len(d)], seg[0, at:at + len(d)], pos[0, at:at + len(d)] = d, i + 1, np.arange(len(d))
        at += len(d)
    ids[0, at:] = rng.integers(0, CFG.vocab_size, s - at)  # padding content must not matter
    loss_fn = jax.jit(loss_sum_and_count, static_argnums=(2, 3))
    packed_sum, packed_count = loss_fn(params, {"input_ids": ids, "segment_ids": seg, "positions": pos}, CFG, 16)
    total, count = 0.0, 0.0
    for d in docs:
        one = {"input_ids": d[None], "segment_ids": np.ones((1, len(d)), np.int32),
               "positions": np.arange(len(d), dtype=np.int32)[None]}
        t, c = loss_sum_and_count(params, one, CFG, len(d))
        total, count = total + float(t), count + float(c)
    assert float(packed_count) == count == sum(lengths) - len(lengths)
    np.testing.assert_allclose(float(packed_sum), total, rtol=2e-5)


def _batch(rng, b, s):
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2:] = 2
    seg[0, -5:] = 0
    pos = np.where(np.arange(s) < s // 2, np.arange(s), np.arange(s) - s // 2).astype(np.int32)
    return {"input_ids": rng.integers(0, CFG.vocab_size, (b, s)).astype(np.int32), "segment_ids": seg,
            "positions": np.broadcast_to(pos, (b, s)).copy()}


def test_grad_accumulation_equals_one_big_batch():
    cfg = CFG.replace(num_layers=1)
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, eps=1e-6), cfg, 10)
    mesh = _single_mesh()
    sh = train_state_shardings(mesh, cfg, tx)
    batch = _batch(np.random.default_rng(2), 8, 32)
    results = []
    for k in (1, 4):
        step = make_train_step(cfg, tx, schedule, micro_batches=k, loss_chunk=16, mesh=mesh, shardings=sh)
        state = create_train_state(cfg, tx, sh, jax.random.key(0))
        results.append(jax.device_get(step(state, batch)))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m4["tokens"] == m1["tokens"]
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["opt_state"]), jax.tree.leaves(s4["opt_state"])):
        np.testing.assert_allclose(b, a, atol=1e-7, rtol=1e-4)


def test_train_state_around_given_params_places_them_once():
    cfg = CFG.replace(num_layers=1)
    tx, _ = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0), cfg, 10)
    mesh = sharding.build_mesh("fsdp=2", devices=jax.devices()[:2])
    sh = train_state_shardings(mesh, cfg, tx)
    params = jax.jit(lambda k: init_params(cfg, k), out_shardings=sh.params)(jax.random.key(3))
    params = jax.tree.map(lambda p: p + 0.5, params)  # nonzero, so optax's moments would show a copy of them
    state = create_train_state(cfg, tx, sh, None, params=params)
    assert all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])))  # not copied
    want = tx.init(jax.device_get(params))  # optax's own init on host arrays
    for got, ref, target in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(want),
                                jax.tree.leaves(sh.state["opt_state"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        assert got.sharding.is_equivalent_to(target, got.ndim)
    assert int(state["step"]) == 0
    host = create_train_state(cfg, tx, sh, None, params=jax.device_get(params))  # host arrays are placed
    for got, target in zip(jax.tree.leaves(host["params"]), jax.tree.leaves(sh.params)):
        assert got.sharding.is_equivalent_to(target, got.ndim) and got.dtype == jnp.float32


def test_build_train_step_abstract_state_matches_the_real_one_and_compiles_ahead_of_time():
    """The builder train.py and the AOT plan share: its abstract state describes the state a run creates
    (shapes, dtypes, shardings), and the step lowered on it runs on real arrays."""
    from phi4_jax.train.loop import build_train_step
    from phi4_jax.train.step import BATCH_KEYS

    cfg = CFG.replace(num_layers=1)
    mesh = sharding.build_mesh("fsdp=2", devices=jax.devices()[:2])
    built = build_train_step(cfg, mesh, optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0), total_steps=10,
                             micro_batches=2, loss_chunk=16)
    state = create_train_state(cfg, built.tx, built.shardings, jax.random.key(0))
    want, got = jax.tree.leaves(built.abstract_state), jax.tree.leaves(state)
    assert len(want) == len(got)
    for a, r in zip(want, got):
        assert (a.shape, a.dtype) == (r.shape, r.dtype) and a.sharding.is_equivalent_to(r.sharding, r.ndim)
    batch = _batch(np.random.default_rng(5), 4, 32)
    abstract_batch = {k: jax.ShapeDtypeStruct((4, 32), jnp.int32, sharding=built.shardings.batch) for k in BATCH_KEYS}
    compiled = built.step_fn.lower(built.abstract_state, abstract_batch).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    placed = {k: jax.device_put(v, built.shardings.batch) for k, v in batch.items()}
    _, metrics = compiled(state, placed)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["tokens"]) > 0


def test_schedule_warmup_then_linear_decay():
    sched = learning_rate_schedule(OptimizerConfig(lr=3e-4, warmup_steps=10, end_lr_ratio=0.1), 110)
    lrs = np.array([float(sched(i)) for i in (0, 4, 9, 10, 60, 110, 500)])
    np.testing.assert_allclose(lrs, [3e-5, 1.5e-4, 3e-4, 3e-4, 1.65e-4, 3e-5, 3e-5], rtol=1e-5)


def test_weight_decay_skips_norms_and_clipping_applies():
    tx, _ = make_optimizer(OptimizerConfig(lr=1.0, warmup_steps=0, weight_decay=0.5, clip_norm=1e-3), CFG, 10)
    p = init_params(CFG, jax.random.key(0))
    zeros = jax.tree.map(jnp.zeros_like, p)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(p), p)
    # zero gradients: the update is pure weight decay, -lr * wd * p, except for norm weights
    np.testing.assert_allclose(updates["lm_head"], -0.5 * p["lm_head"], rtol=1e-6)
    assert float(jnp.abs(updates["final_norm"]).max()) == 0.0


def test_flops_per_token_counts_attention():
    cfg = get_preset("phi4-14b")
    f4k, f16k = training_flops_per_token(cfg, 4096), training_flops_per_token(cfg, 16384)
    dense = 6 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size)
    assert f4k == pytest.approx(dense + 6 * 40 * 40 * 128 * 4096)
    assert f16k - f4k == pytest.approx(6 * 40 * 5120 * (16384 - 4096))


def test_16k_sequence_step_of_tiny_model_runs():
    cfg = CFG.replace(num_layers=1, num_heads=2, num_kv_heads=1, remat_policy="full")
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0), cfg, 10)
    mesh = _single_mesh()
    sh = train_state_shardings(mesh, cfg, tx)
    state = create_train_state(cfg, tx, sh, jax.random.key(0))
    step = make_train_step(cfg, tx, schedule, micro_batches=1, loss_chunk=2048, mesh=mesh, shardings=sh)
    s = 16384
    rng = np.random.default_rng(3)
    seg = np.repeat(np.arange(1, 5, dtype=np.int32), s // 4)[None]
    pos = np.tile(np.arange(s // 4, dtype=np.int32), 4)[None]
    batch = {"input_ids": rng.integers(0, cfg.vocab_size, (1, s)).astype(np.int32), "segment_ids": seg,
             "positions": pos}
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["tokens"]) == s - 4
    assert abs(float(metrics["loss"]) - np.log(cfg.vocab_size)) < 0.5
