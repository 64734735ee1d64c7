"""The training loop and CLI: exact resume after SIGTERM, non-finite loss, config errors, the demo.

Runs in-process on the 8 simulated CPU devices of tests/conftest.py (the demo mesh fsdp=-1 fills them).
"""

import json
import math
import os
import signal
import sys

import numpy as np
import pytest

from phi4_jax.train import loop as trainer
from phi4_jax.train.config import TrainConfigError, load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as train_cli  # noqa: E402

DEMO = os.path.join(ROOT, "configs", "demo.toml")
SMALL = ["model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=2",
         "model.num_kv_heads=1", "model.head_dim=32", "train.global_batch=8", "train.seq_len=64",
         "train.loss_chunk=32", "train.steps=6", "checkpoint.save_every=2", "checkpoint.keep=5",
         "optimizer.warmup_steps=2"]


def _one_device():
    import jax

    from phi4_jax.model import sharding
    return sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in trainer.read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def _wrap_step(monkeypatch, after_call):
    """Wraps the jitted train step so `after_call(n, state, metrics)` runs after the n-th call."""
    real = trainer.make_train_step

    def make(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = [0]

        def wrapped(state, batch):
            state, metrics = step(state, batch)
            calls[0] += 1
            return state, after_call(calls[0], metrics)

        return wrapped

    monkeypatch.setattr(trainer, "make_train_step", make)


def test_resume_after_sigterm_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGTERM handlers need the main thread")
    cfg = load_train_config(DEMO, SMALL)
    mesh = _one_device()
    full = trainer.train(cfg, str(tmp_path / "full"), progress=False, mesh=mesh)
    assert full["last_step"] == 6 and not full["stopped_by_sigterm"]

    def sigterm_at_3(n, metrics):
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    with monkeypatch.context() as m:
        _wrap_step(m, sigterm_at_3)
        cut = trainer.train(cfg, str(tmp_path / "cut"), progress=False, mesh=mesh)
    assert cut["stopped_by_sigterm"] and cut["last_step"] == 3
    assert sorted(int(d) for d in os.listdir(tmp_path / "cut" / "checkpoints") if d.isdigit()) == [2, 3]
    resumed = trainer.train(cfg, str(tmp_path / "cut"), progress=False, mesh=mesh)
    assert resumed["last_step"] == 6
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert got == want  # bit-exact: same params, optimizer state and data position after resume


def test_metrics_of_a_step_are_fetched_after_the_next_step_is_dispatched(tmp_path, monkeypatch):
    import jax

    events = []

    def dispatched(n, metrics):
        events.append(f"dispatch {n}")
        return metrics

    real_get, fetched = jax.device_get, [0]

    def device_get(x):
        if isinstance(x, dict) and "loss" in x:  # a step's metrics
            fetched[0] += 1
            events.append(f"fetch {fetched[0]}")
        return real_get(x)

    _wrap_step(monkeypatch, dispatched)
    monkeypatch.setattr(jax, "device_get", device_get)
    cfg = load_train_config(DEMO, SMALL + ["train.steps=5", "checkpoint.save_every=3"])
    trainer.train(cfg, str(tmp_path), progress=False, mesh=_one_device())
    # step 3 is saved: its loss is fetched (and checked) before its state is saved and step 4 dispatched;
    # the last step is fetched at once
    assert events == ["dispatch 1", "dispatch 2", "fetch 1", "dispatch 3", "fetch 2", "fetch 3", "dispatch 4",
                      "dispatch 5", "fetch 4", "fetch 5"]
    records = trainer.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["seconds"] >= r["data_seconds"] >= 0 for r in records)
    # the realised mixture: every step's tokens (8 full rows of 64), counted under their sources
    assert all(list(r["source_tokens"]) == [s.name for s in cfg.data.sources] for r in records)
    assert all(sum(r["source_tokens"].values()) == 8 * 64 for r in records)


def test_prefetched_batches_checkpoint_the_last_consumed_batch():
    """The prefetch threads read ahead, yet the saved iterator state is that of the last batch handed out."""
    import time

    import grain
    import jax

    produced = []

    def row(i):
        produced.append(int(i))
        return np.full((4,), i, np.int32)

    def dataset():
        return grain.MapDataset.range(1000).map(row).to_iter_dataset().batch(2)

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    plain = [b for _, b in zip(range(6), iter(dataset()))]
    it = trainer.prefetched_batches(dataset().map(lambda b: {"x": b}), sharding, host_buffer=2)
    first = [np.asarray(next(it)["x"]) for _ in range(2)]
    deadline = time.monotonic() + 60     # let the background threads read ahead (a loaded machine is slow)
    while len(produced) <= 12 + 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    # rows of more than the 2 consumed (+ the 6 of `plain`) were read
    assert len(produced) > 12 + 6, f"the prefetch threads read only {len(produced)} rows in 60 s"
    state = it.get_state()
    later = [np.asarray(next(it)["x"]) for _ in range(2)]
    it.close()
    resumed = trainer.prefetched_batches(dataset().map(lambda b: {"x": b}), sharding)
    resumed.set_state(state)
    again = [np.asarray(next(resumed)["x"]) for _ in range(2)]
    resumed.close()
    for got, want in zip(first + later, plain[:4]):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(again, plain[2:4]):
        np.testing.assert_array_equal(got, want)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = load_train_config(DEMO, SMALL)

    def nan_at_3(n, metrics):
        return {**metrics, "loss": metrics["loss"] * math.nan} if n == 3 else metrics

    _wrap_step(monkeypatch, nan_at_3)
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step 3.*last good checkpoint is step 2"):
        trainer.train(cfg, str(tmp_path), progress=False, mesh=_one_device())
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved == [2]  # the interval save; nothing from the bad step on


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lr=-1"], "optimizer.lr must be positive"),
    (["train.global_batch=10", "train.micro_batches=4"], "divisible by train.micro_batches"),
    (["model.preset='phi5'"], "unknown model preset 'phi5'"),
    (["model.num_kv_heads=3"], "multiple of num_kv_heads"),
    (["train.seq_len=4096"], "exceeds model.max_position_embeddings"),
    (["optimizer.learning_rate=1e-4"], r"unknown key\(s\) in \[optimizer\]: \['learning_rate'\]"),
    (["trian.steps=3"], r"unknown config section\(s\) \['trian'\]"),
    (["mesh.fsdp=0"], "positive integer or -1"),
    (["data.sources=[]"], "data.sources is empty"),
    (["train.steps"], "must look like SECTION.KEY=VALUE"),
])
def test_bad_configs_give_clear_errors(overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(DEMO, overrides)


def test_cli_reports_bad_config_and_mesh(tmp_path, capsys):
    assert train_cli.main(["--config", str(tmp_path / "nope.toml"), "--workdir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # 8 devices cannot form a tensor=3 mesh; tensor=4 does not divide the demo's 2 KV heads
    assert train_cli.main(["--workdir", str(tmp_path), "--set", "mesh.tensor=3"]) == 2
    assert "not divisible by the fixed axes" in capsys.readouterr().err
    assert train_cli.main(["--workdir", str(tmp_path), "--set", "mesh.tensor=4", "--set", "mesh.fsdp=2"]) == 2
    assert "does not divide num_kv_heads=2" in capsys.readouterr().err
    assert train_cli.main(["--workdir", str(tmp_path), "--set", "train.global_batch=4"]) == 2
    assert "micro-batch size 4 is not divisible by the data-parallel mesh axes" in capsys.readouterr().err


def test_end_of_run_samples_use_the_sharded_params(tmp_path, monkeypatch):
    """Sampling after a run on 8 devices gathers nothing to the host and equals generation from a host copy."""
    import jax

    from phi4_jax.inference.engine import generate
    from phi4_jax.model.decoder import model_from_params

    cfg = load_train_config(DEMO, SMALL + ["train.steps=2", "optimizer.lr=0.05"])
    run = trainer.train(cfg, str(tmp_path), progress=False)   # the demo mesh: fsdp over all 8 devices
    params = run["state"]["params"]
    assert len(params["embed"].sharding.device_set) == 8
    prompts = list(cfg.demo.sample_prompts[:2])
    host = model_from_params(cfg.model, jax.device_get(params))
    tok = run["tokenizer"]
    want = [tok.decode(o) for o in generate(host, [tok.encode(p) for p in prompts], max_new_tokens=6,
                                            stop_tokens=[tok.endoftext_id])]

    real_get, largest = jax.device_get, max(leaf.size for leaf in jax.tree.leaves(params))

    def no_gather(x):   # the engine fetches each step's few sampled tokens; no parameter may come to the host
        if any(getattr(leaf, "size", 0) >= largest for leaf in jax.tree.leaves(x)):
            raise AssertionError("sample_continuations gathered arrays to the host")
        return real_get(x)

    monkeypatch.setattr(jax, "device_get", no_gather)
    got = trainer.sample_continuations(run["state"], cfg.model, tok, prompts, 6, run["mesh"])
    assert got == want


def test_cli_resume_refuses_a_changed_config_unless_allowed(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    base = ["--workdir", workdir, "--no-progress", "--set", "demo.plot=false", "--set", "demo.sample_prompts=[]"]
    for item in SMALL + ["train.steps=2"]:
        base += ["--set", item]
    assert train_cli.main(base) == 0
    capsys.readouterr()
    changed = base + ["--set", "optimizer.lr=1e-2", "--set", "model.rms_norm_eps=1e-6"]
    assert train_cli.main(changed + ["--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "--allow-config-change" in err
    assert "optimizer.lr: 0.003 -> 0.01" in err and "model.rms_norm_eps: 1e-05 -> 1e-06" in err
    assert "train.steps" not in err  # steps (and logging, saving, mesh) may change on resume
    assert len(trainer.read_metrics(os.path.join(workdir, "metrics.jsonl"))) == 2  # nothing ran
    # more steps, another save interval and mesh: a plain resume
    assert train_cli.main(base + ["--steps", "3", "--save-every", "3", "--set", "mesh.data=2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert train_cli.main(changed + ["--steps", "4", "--allow-config-change"]) == 0
    out = capsys.readouterr().out
    assert "resuming with a changed config" in out and "resumed from" in out
    assert [r["step"] for r in trainer.read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3, 4]
    assert json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["lr"] == 1e-2  # the new one


def test_demo_cli_loss_falls_and_samples(tmp_path, capsys):
    workdir = str(tmp_path / "demo")
    args = ["--workdir", workdir, "--steps", "30", "--save-every", "15", "--no-progress",
            "--set", "demo.max_new_tokens=8"]
    assert train_cli.main(args) == 0
    out = capsys.readouterr().out
    records = trainer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 31))
    losses = np.array([r["loss"] for r in records])
    assert losses[0] > np.log(200) - 1.0        # starts near uniform over the ~220-token vocabulary
    assert losses[-5:].mean() < losses[0] - 2.0  # and visibly falls
    assert all(k in records[-1] for k in ("grad_norm", "lr", "tokens_per_s"))
    assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000
    assert "samples (greedy):" in out and "'Once upon a time, Lily had a' ->" in out
    # running again resumes from the newest checkpoint: nothing left to do, no new metrics
    assert train_cli.main(args) == 0
    assert "resumed from" in capsys.readouterr().out
    assert len(trainer.read_metrics(os.path.join(workdir, "metrics.jsonl"))) == 30
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 30


def test_converted_checkpoint_starts_a_run(tmp_path, capsys):
    """A Hugging Face-layout checkpoint -> convert_weights' converter -> train.init_from."""
    import jax
    from safetensors.numpy import save_file

    from phi4_jax.checkpoint.hf_convert import hf_to_checkpoint
    from phi4_jax.checkpoint.hf_mapping import hf_state_dict_from_params
    from phi4_jax.model import sharding
    from phi4_jax.train.checkpoints import TrainCheckpointError, init_params_from
    from phi4_jax.train.optimizer import make_optimizer
    from phi4_jax.train.step import init_params, train_state_shardings

    cfg = load_train_config(DEMO, SMALL + ["train.steps=1", "model.rope_theta=5000.0"])
    stored_config = cfg.model.replace(rope_theta=10000.0)  # midtraining-style change of the RoPE base
    params = jax.device_get(init_params(stored_config, jax.random.key(7)))
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in hf_state_dict_from_params(params, stored_config).items()},
              str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps(stored_config.to_hf_dict(torch_dtype="float32")))
    converted = tmp_path / "converted"
    hf_to_checkpoint(hf_dir, converted, progress=False)

    mesh = sharding.build_mesh(cfg.mesh)
    tx, _ = make_optimizer(cfg.optimizer, cfg.model, 1)
    sh = train_state_shardings(mesh, cfg.model, tx)
    loaded = init_params_from(str(converted), cfg.model, sh.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(loaded))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TrainCheckpointError, match="different architecture.*num_layers"):
        init_params_from(str(converted), cfg.model.replace(num_layers=2), sh.params)

    # a run starts from it, and a later stage can start from that run's workdir (midtraining from pretraining)
    logs = []
    cfg_run = load_train_config(DEMO, SMALL + ["train.steps=1", "model.rope_theta=5000.0",
                                               f"train.init_from={converted}"])
    run = trainer.train(cfg_run, str(tmp_path / "run"), progress=False, log=logs.append, mesh=_one_device())
    assert f"initialized parameters from {converted}" in logs
    import orbax.checkpoint as ocp
    requested = []
    real_restore = ocp.CheckpointManager.restore

    def spy(self, step, args=None, **kwargs):
        requested.append(args)
        return real_restore(self, step, args=args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ocp.CheckpointManager, "restore", spy)
        stage2 = init_params_from(str(tmp_path / "run"), cfg.model, sh.params)
    # only the params subtree of the train state is read (no optimizer moments, no data iterator)
    assert [sorted(a.keys()) for a in requested] == [["state"]]
    assert list(requested[0]["state"].item) == ["params"]
    for a, b in zip(jax.tree.leaves(jax.device_get(run["state"]["params"])), jax.tree.leaves(jax.device_get(stage2))):
        np.testing.assert_array_equal(a, b)
