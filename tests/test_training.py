"""Train step pieces on one device: chunked loss, packing, gradient accumulation, schedule, 16K step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax.model import sharding
from phi4_jax.model.config import get_preset
from phi4_jax.model.decoder import forward, hidden_states
from phi4_jax.train.config import OptimizerConfig
from phi4_jax.train.loss import chunked_cross_entropy_sum, loss_sum_and_count, next_token_targets
from phi4_jax.train.mfu import training_flops_per_token
from phi4_jax.train.optimizer import learning_rate_schedule, make_optimizer
from phi4_jax.train.step import create_train_state, init_params, make_train_step, train_state_shardings

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


@pytest.mark.parametrize("warmup, decay_steps, end_ratio, total", [
    (10, None, 0.1, 110),    # phi-4's shape: warm-up, then linear decay over the rest of the run
    (1, 50, 0.0, 200),       # explicit decay length shorter than the run, decay to 0, then constant
    (0, None, 0.25, 40),     # no warm-up
])
def test_schedule_equals_optax_linear_warmup_and_decay(warmup, decay_steps, end_ratio, total):
    """`learning_rate_schedule` at every step against optax's own schedules: `optax.join_schedules` of a
    `linear_schedule` warm-up from lr/warmup (step 0) to lr at step warmup - 1 and a `linear_schedule` decay
    from lr to lr * end_lr_ratio over decay_steps. Warming up to step `warmup` instead of `warmup - 1`, or
    decaying over `total` instead of `total - warmup` steps, fails this test."""
    import optax

    peak = 3e-4
    ours = learning_rate_schedule(OptimizerConfig(lr=peak, warmup_steps=warmup, decay_steps=decay_steps,
                                                  end_lr_ratio=end_ratio), total)
    decay = optax.linear_schedule(peak, peak * end_ratio, decay_steps or total - warmup)
    if warmup:
        want = optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup - 1), decay], [warmup])
    else:
        want = decay
    steps = np.arange(total + 30)
    np.testing.assert_allclose([float(ours(i)) for i in steps], [float(want(i)) for i in steps],
                               rtol=1e-5, atol=1e-12)
    # and at a few steps by hand (phi-4's shape: 10 warm-up steps to 3e-4, decay to 3e-5 over 100 steps)
    if warmup == 10:
        np.testing.assert_allclose([float(ours(i)) for i in (0, 4, 9, 10, 60, 110, 500)],
                                   [3e-5, 1.5e-4, 3e-4, 3e-4, 1.65e-4, 3e-5, 3e-5], rtol=1e-5)


def test_weight_decay_skips_norms():
    tx, _ = make_optimizer(OptimizerConfig(lr=1.0, warmup_steps=0, weight_decay=0.5, clip_norm=None), CFG, 10)
    p = init_params(CFG, jax.random.key(0))
    zeros = jax.tree.map(jnp.zeros_like, p)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(p), p)
    # zero gradients: the update is pure weight decay, -lr * wd * p, except for norm weights
    np.testing.assert_allclose(updates["lm_head"], -0.5 * p["lm_head"], rtol=1e-6)
    assert float(jnp.abs(updates["final_norm"]).max()) == 0.0


def test_clipping_scales_gradients_to_clip_norm():
    """Gradients of global norm ~100x clip_norm: the first update equals Adam's first step (by hand:
    -lr * g / (|g| + eps) elementwise) on the gradients scaled by clip_norm / global_norm (computed here in
    float64), and differs from the unclipped one. eps is large (1e-2) so Adam's first step depends on the
    gradient's scale. Dropping the clip from the optimizer chain, or clipping each leaf by its own norm,
    fails this test."""
    clip, lr, eps = 0.5, 0.1, 1e-2
    tx, _ = make_optimizer(OptimizerConfig(lr=lr, warmup_steps=0, weight_decay=0.0, clip_norm=clip, eps=eps),
                           CFG, 10)
    p = init_params(CFG, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) * (1 + i % 3)
                                         for i, (k, x) in enumerate(zip(keys, leaves))])
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    assert norm > 100 * clip

    updates, _ = jax.jit(tx.update)(grads, tx.init(p), p)

    def adam_first_step(g):
        return -lr * g / (np.abs(g) + eps)

    flat_updates, _ = jax.tree_util.tree_flatten_with_path(updates)
    for (path, u), g in zip(flat_updates, jax.tree.leaves(grads)):
        g = np.asarray(g, np.float64)
        want = adam_first_step(g * clip / norm)
        np.testing.assert_allclose(np.asarray(u), want, rtol=2e-4, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
        unclipped = adam_first_step(g)
        assert np.max(np.abs(unclipped - want)) > 0.1 * lr, "clipping should change this update"


def test_flops_per_token_equal_a_hand_count():
    """`training_flops_per_token` against parameter counts written out here: phi-4 14B from its published total
    (PHI4.md: 14,659,507,200 parameters, embedding 100352 x 5120), and the tiny preset from its shapes.
    Counting the embedding lookup as matmul FLOPs, or non-causal attention (S instead of S/2 keys per query),
    fails this test."""
    cfg = get_preset("phi4-14b")
    matmul_params = 14_659_507_200 - 100352 * 5120
    assert training_flops_per_token(cfg, 4096) == pytest.approx(6 * matmul_params + 6 * 40 * 40 * 128 * 4096,
                                                                rel=1e-12)
    assert training_flops_per_token(cfg, 16384) == pytest.approx(6 * matmul_params + 6 * 40 * 40 * 128 * 16384,
                                                                 rel=1e-12)
    # tiny: hidden 64, ffn 160, 2 layers, 4 q heads / 2 kv heads of dim 16, vocab 512
    tiny = get_preset("tiny")
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads,
            tiny.head_dim, tiny.vocab_size) == (64, 160, 2, 4, 2, 16, 512)
    per_layer = 64 * (4 + 2 + 2) * 16 + 4 * 16 * 64 + 3 * 64 * 160 + 2 * 64   # qkv, o, gate/up/down, 2 norms
    matmul_params = 2 * per_layer + 64 + 64 * 512                                # + final norm, lm_head
    attention = 6 * 2 * 4 * 16 * 256                                             # 6 * L * Hq * D * S
    assert training_flops_per_token(tiny, 256) == 6 * matmul_params + attention


def test_mfu_is_model_flops_over_peak():
    """MFU = flops per token x tokens/s / (peak per device x devices), for given numbers; the peak comes from the
    device kind (H100 SXM dense bf16 989 TFLOP/s). Leaving out the device count fails this test."""
    from types import SimpleNamespace

    from phi4_jax.train.mfu import mfu, peak_flops_per_device

    assert mfu(2e9, 1.5e5, 4, 1e15) == pytest.approx(2e9 * 1.5e5 / 4e15)    # 0.075
    assert mfu(2e9, 1.5e5, 4, None) is None
    assert peak_flops_per_device(SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops_per_device(SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert peak_flops_per_device(SimpleNamespace(device_kind="cpu")) is None


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
