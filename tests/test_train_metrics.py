"""Training metrics: the step-time split and goodput in metrics.jsonl, TensorBoard event files beside it (read
back with TensorBoard's own event reader), and metrics.jsonl trimmed to the step a run resumes from."""

import json
import os

import pytest

from phi4_jax.train import loop as trainer
from phi4_jax.train.config import load_train_config
from phi4_jax.train.metrics import MetricsWriter, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.toml")
SMALL = ["model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=2",
         "model.num_kv_heads=1", "model.head_dim=32", "train.global_batch=8", "train.seq_len=64",
         "train.loss_chunk=32", "train.steps=4", "checkpoint.save_every=2", "optimizer.warmup_steps=2"]


def tensorboard_scalars(logdir, tag):
    """(step, value) of a scalar as TensorBoard itself reads the run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("metrics"))
    result = trainer.train(load_train_config(DEMO, SMALL), workdir, progress=False)
    return workdir, read_metrics(result["metrics_path"]), result["mesh"].size


def test_step_time_split_and_goodput(run):
    _, records, n_devices = run
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert sum(r[k] for k in ("data_seconds", "compile_seconds", "checkpoint_seconds", "compute_seconds")) \
            == pytest.approx(r["seconds"], rel=1e-9)
        assert min(r[k] for k in ("data_seconds", "compile_seconds", "checkpoint_seconds", "compute_seconds")) >= 0
        assert 0 < r["goodput"] < 1
        assert r["goodput"] == pytest.approx(r["productive_seconds"] / r["elapsed_seconds"], rel=1e-12)
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / n_devices, rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["seconds"], rel=1e-12)
    # productive time is the running sum of the steps' compute time; the wall time also holds set-up
    total = 0.0
    for r in records:
        total += r["compute_seconds"]
        assert r["productive_seconds"] == pytest.approx(total, rel=1e-9)
    assert records[-1]["elapsed_seconds"] > sum(r["seconds"] for r in records)
    # compilation only in the first step; the save after step 2 blocks inside step 3's interval
    assert [r["compile_seconds"] > 0 for r in records] == [True, False, False, False]
    assert [r["checkpoint_seconds"] > 0 for r in records] == [False, False, True, False]


def test_tensorboard_events_hold_the_logged_metrics(run):
    workdir, records, _ = run
    assert any(name.startswith("events.out.tfevents.") for name in os.listdir(workdir))
    for tag in ("loss", "goodput", "tokens_per_s_per_device", "data_seconds"):
        events = tensorboard_scalars(workdir, tag)
        assert [s for s, _ in events] == [r["step"] for r in records]
        assert [v for _, v in events] == pytest.approx([r[tag] for r in records], rel=1e-6)


def test_metrics_are_trimmed_to_the_resumed_step(tmp_path):
    """Records a killed run logged after its last checkpoint (and a torn last line) are dropped on resume."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    writer = MetricsWriter(str(tmp_path), start_step=3, tensorboard=False)
    writer.write({"step": 4, "loss": 0.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]
    untouched = path.read_text()
    MetricsWriter(str(tmp_path), start_step=4, tensorboard=False).close()
    assert path.read_text() == untouched
