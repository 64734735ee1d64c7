"""`python train.py --workdir gs://BUCKET/run` against a real GCS JSON API server on 127.0.0.1
(gcp-storage-emulator; tests/gcs_emulator.py): the run trains into the bucket (config, metrics, TensorBoard events,
plot, Orbax checkpoints all under gs://BUCKET/run), is SIGKILLed mid-run and resumes exactly from the bucket, a
resume with another config is refused, and a bucket that does not exist is refused before any step.
"""

import os

import pytest
from killed_run import run_train

from phi4_jax import paths
from phi4_jax.train import loop as trainer
from phi4_jax.train.checkpoints import TrainCheckpointer
from phi4_jax.train.config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.toml")
SMALL = ["model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=2",
         "model.num_kv_heads=1", "model.head_dim=32", "train.global_batch=8", "train.seq_len=64",
         "train.loss_chunk=32", "train.steps=6", "checkpoint.save_every=2", "checkpoint.keep=5",
         "optimizer.warmup_steps=2", "demo.sample_prompts=[]"]
CLI_ARGS = ["--no-progress"] + [a for item in SMALL for a in ("--set", item)]

def _tensorboard_scalars(logdir, tag):
    """(step, value) of a scalar as TensorBoard itself reads the run (its fsspec reader for gs://)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_train_on_gcs_killed_and_resumed_exactly(gcs, tmp_path):
    workdir = f"gs://{gcs.bucket()}/run"
    # the uninterrupted reference, on local disk in this process
    reference = trainer.train(load_train_config(DEMO, SMALL), str(tmp_path / "ref"), progress=False)
    want = [(r["step"], r["loss"]) for r in trainer.read_metrics(reference["metrics_path"])]

    killed = run_train(["--workdir", workdir, *CLI_ARGS], gcs.env, kill_at_step=5)   # steps 1-4 ran
    assert killed.returncode == -9, killed.stderr[-3000:]
    saved = {int(os.path.basename(p)) for p in paths.glob(f"{workdir}/checkpoints/*")
             if os.path.basename(p).isdigit()}
    assert 2 in saved and max(saved) <= 4

    resumed = run_train(["--workdir", workdir, *CLI_ARGS], gcs.env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints at step" in resumed.stdout
    got = [(r["step"], r["loss"]) for r in trainer.read_metrics(f"{workdir}/metrics.jsonl")]
    assert got == want   # every step once, bit-exact: params, optimizer and data position came back from the bucket
    events = _tensorboard_scalars(workdir, "loss")   # TensorBoard reading the bucket
    assert [s for s, _ in events] == [1, 2, 3, 4, 5, 6]   # the killed run's steps after its checkpoint purged
    assert [v for _, v in events] == pytest.approx([loss for _, loss in want], rel=1e-6)
    paths.forget_listings(workdir)   # this process listed the checkpoints before the resumed run wrote more
    final = TrainCheckpointer(workdir, save_every=2, keep=5)   # Orbax, reading the bucket
    assert final.latest_step() == 6 and final.directory == f"{workdir}/checkpoints"
    final.close()
    assert {os.path.basename(p) for p in paths.glob(f"{workdir}/checkpoints/6/*")} >= {"state", "data"}
    assert paths.exists(f"{workdir}/config.json") and len(paths.read_bytes(f"{workdir}/loss.png")) > 1000

    # the next stage starts from the bucket's newest checkpoint (train.init_from = the gs:// workdir)
    logs = []
    stage2 = trainer.train(load_train_config(DEMO, SMALL + ["train.steps=1", f"train.init_from={workdir!r}"]),
                           str(tmp_path / "stage2"), progress=False, log=logs.append)
    assert f"initialized parameters from {workdir}" in logs
    assert trainer.read_metrics(stage2["metrics_path"])[0]["loss"] < want[0][1] - 0.5   # trained, not fresh

    # a resume with another config is refused and changes nothing in the bucket
    before = {p: paths.read_bytes(p) for p in (f"{workdir}/metrics.jsonl", f"{workdir}/config.json")}
    changed = run_train(["--workdir", workdir, *CLI_ARGS, "--steps", "8", "--set", "optimizer.lr=1e-2"], gcs.env)
    assert changed.returncode == 2
    assert "different config" in changed.stderr and "optimizer.lr: 0.003 -> 0.01" in changed.stderr
    assert {p: paths.read_bytes(p) for p in before} == before


def test_missing_bucket_is_refused_before_any_step(gcs, capsys):
    from phi4_jax.cli.train import main

    assert main(["--workdir", "gs://no-such-bucket-here/run", *CLI_ARGS]) == 2
    err = capsys.readouterr().err
    assert "error: workdir gs://no-such-bucket-here/run: bucket gs://no-such-bucket-here does not exist" in err
    assert not paths.exists("gs://no-such-bucket-here")
