"""Meshes, the rules table, and a sharded train step on 8 simulated CPU devices (tests/conftest.py sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from phi4_jax.model import sharding
from phi4_jax.model.config import get_preset
from phi4_jax.train.config import OptimizerConfig
from phi4_jax.train.optimizer import make_optimizer
from phi4_jax.train.step import create_train_state, make_train_step, train_state_shardings

CFG = get_preset("tiny")  # 4 q heads, 2 kv heads, embed 64, mlp 160, vocab 512


def _need_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices: run under tests/conftest.py")


def test_mesh_fill_and_axis_types():
    _need_8()
    mesh = sharding.build_mesh("tensor=2")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    mesh = sharding.build_mesh({"data": 2, "fsdp": -1, "context": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}


@pytest.mark.parametrize("spec, message", [
    ("fsdp=3", "needs 3 devices"),
    ("data=-1,fsdp=-1", "at most one"),
    ("fsdp=-1,tensor=3", "not divisible"),
    ("dcn_data=2", "several slices"),
    ("fsdp=x", "must be an integer"),
    ("pipeline=2", "unknown mesh axis"),
])
def test_bad_meshes_raise_clear_errors(spec, message):
    _need_8()
    with pytest.raises(sharding.MeshError, match=message):
        sharding.build_mesh(spec)


def test_tensor_axis_must_divide_kv_heads():
    _need_8()
    mesh = sharding.build_mesh("fsdp=2,tensor=4")
    with pytest.raises(sharding.MeshError, match=r"num_kv_heads=10"):
        sharding.validate_model_mesh(get_preset("phi4-14b"), mesh)
    with pytest.raises(sharding.MeshError, match=r"num_kv_heads=2"):
        sharding.validate_model_mesh(CFG, mesh)


def test_batch_must_divide_data_axes():
    _need_8()
    mesh = sharding.build_mesh("data=2,fsdp=4")
    sharding.validate_batch_mesh(mesh, 16, 128)
    with pytest.raises(sharding.MeshError, match=r"batch size 12 is not divisible.*size 8"):
        sharding.validate_batch_mesh(mesh, 12, 128)
    mesh = sharding.build_mesh("fsdp=4,context=2")
    with pytest.raises(sharding.MeshError, match="sequence length 127"):
        sharding.validate_batch_mesh(mesh, 4, 127)


def test_rules_table_specs():
    rules = sharding.TRAINING_RULES
    assert sharding.logical_to_spec(("vocab", "embed"), rules) == P("tensor", ("fsdp", "context"))
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), rules) == \
        P(None, ("fsdp", "context"), "tensor", None)
    # activations: batch takes data+fsdp, so embed is left unsharded
    assert sharding.logical_to_spec(("batch", "seq", "embed"), rules) == P(("data", "fsdp"), "context", None)
    assert sharding.logical_to_spec(("batch", "seq", "mlp"), rules) == P(("data", "fsdp"), "context", "tensor")


@pytest.fixture(scope="module")
def steps():
    """One optimizer step of the same tiny model on 1 device and on a data=2,fsdp=2,tensor=2 mesh."""
    _need_8()
    # Adam's first update is lr * g / (|g| + eps): with the default eps (1e-8) it amplifies the rounding of
    # gradients near 1e-8 (summation order differs across shardings) to ~1% of lr; eps=1e-6 keeps the
    # comparison well-conditioned without changing what it tests (the sharded step computes the same update).
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, eps=1e-6), CFG, total_steps=10)
    rng = np.random.default_rng(0)
    b, s = 8, 64
    seg = np.ones((b, s), np.int32)
    seg[:, 40:] = 2
    seg[1, 60:] = 0
    pos = np.where(np.arange(s) < 40, np.arange(s), np.arange(s) - 40).astype(np.int32)
    batch = {"input_ids": rng.integers(0, CFG.vocab_size, (b, s)).astype(np.int32), "segment_ids": seg,
             "positions": np.broadcast_to(pos, (b, s)).copy()}
    out = {}
    for name, mesh in (("single", sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])),
                       ("sharded", sharding.build_mesh("data=2,fsdp=2,tensor=2"))):
        sh = train_state_shardings(mesh, CFG, tx)
        state = create_train_state(CFG, tx, sh, jax.random.key(0))
        step = make_train_step(CFG, tx, schedule, micro_batches=1, loss_chunk=16, mesh=mesh, shardings=sh)
        new_state, metrics = step(state, {k: jax.device_put(v, sh.batch) for k, v in batch.items()})
        out[name] = (new_state, metrics, sh)
    return out


def test_sharded_step_matches_single_device(steps):
    single, sharded = steps["single"], steps["sharded"]
    for key in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(float(sharded[1][key]), float(single[1][key]), rtol=1e-5)
    flat_a = jax.tree_util.tree_leaves_with_path(jax.device_get(single[0]["params"]))
    flat_b = jax.tree.leaves(jax.device_get(sharded[0]["params"]))
    for (path, a), b in zip(flat_a, flat_b):
        # Adam's first step is ~lr * sign(g): allow 1% of lr where g is ~0 and rounding flips it
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
        assert np.mean(np.abs(b - a)) < 1e-6, jax.tree_util.keystr(path)
    assert int(sharded[0]["step"]) == 1
    # The updated params only show sign(g) (Adam's first step): compare the gradients themselves through
    # Adam's first moment, (1 - b1) * clipped gradient, element by element.
    mu_a = jax.tree_util.tree_leaves_with_path(jax.device_get(single[0]["opt_state"][1][0].mu))
    mu_b = jax.tree.leaves(jax.device_get(sharded[0]["opt_state"][1][0].mu))
    for (path, a), b in zip(mu_a, mu_b):
        scale = float(np.max(np.abs(a)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_state_carries_declared_shardings(steps):
    state, _, sh = steps["sharded"]
    declared = jax.tree.leaves(sh.state)
    actual = jax.tree.leaves(state)
    assert len(declared) == len(actual)
    for arr, want in zip(actual, declared):
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (arr.shape, arr.sharding, want)
    # spot checks: weights and Adam moments split over fsdp and tensor
    q = state["params"]["layers"]["q_proj"]
    assert q.sharding.spec == P(None, ("fsdp", "context"), "tensor", None)
    mu = state["opt_state"][1][0].mu["layers"]["q_proj"]
    assert mu.sharding.spec == P(None, ("fsdp", "context"), "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)


def _run_plan(*args):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # plan.py must set it itself
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "phi4_jax.plan", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_plan_cli_compiles_for_simulated_devices():
    out = _run_plan("--model", "tiny", "--mesh", "fsdp=2,tensor=2", "--seq-len", "256", "--global-batch", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "on 4 cpu devices" in out.stdout and "temporaries" in out.stdout
    assert "attention=xla" in lines       # what a run on CPU devices uses (kernels.default_implementation)
    assert lines[-1].startswith("peak_bytes_per_device=")
    # At least this device's share of the fp32 train state (params + Adam mu and nu: 12 bytes per parameter,
    # split over 4 devices at most). tiny, counted by hand: per layer q/k/v 64 x (4 + 2 + 2) x 16, o 4 x 16 x 64,
    # gate/up/down 3 x 64 x 160, two norms 2 x 64; 2 layers; final norm 64; embed and lm_head 2 x 512 x 64.
    tiny_params = 2 * (64 * 8 * 16 + 4 * 16 * 64 + 3 * 64 * 160 + 2 * 64) + 64 + 2 * 512 * 64
    assert int(lines[-1].split("=")[1]) >= 12 * tiny_params // 4, lines[-1]
    bad = _run_plan("--model", "phi4-14b", "--mesh", "fsdp=2,tensor=4", "--seq-len", "256")
    assert bad.returncode == 2 and "does not divide num_kv_heads=10" in bad.stderr
