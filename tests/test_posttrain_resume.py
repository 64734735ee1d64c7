"""SFT and DPO runs killed for real and resumed exactly: `python train.py` (a subprocess, a checkpoint every step)
SIGKILLs itself as step 3 starts; `train()` then resumes its workdir from what the killed process left on disk, and
ends with the metrics of every step and the final parameters bit-equal to an uninterrupted run's (the same
single-device program: float arithmetic is deterministic on CPU, so nothing needs a tolerance). The DPO run continues
from the SFT run, so one tiny model serves both; its reference log-probs are precomputed once beside the data and
found again on resume."""

import glob
import json
import os

import jax
import numpy as np
import pytest
from killed_run import run_train

from phi4_jax.model import sharding
from phi4_jax.train.config import load_train_config
from phi4_jax.train.loop import read_metrics, train

STEPS, KILL_AT = 4, 3
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
# the per-step values a resumed run must reproduce (not the timings)
COMPARED = ("step", "loss", "grad_norm", "lr", "tokens", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected")


def _write_config(path, objective: str, data_key: str, data: str, init_from: str = "") -> str:
    init = f'init_from = "{init_from}"\n' if init_from else ""
    path.write_text(f"""
[model]
preset = "tiny"
vocab_size = 256
max_position_embeddings = 128
num_layers = 1

[optimizer]
lr = 1e-3
warmup_steps = 0

[train]
objective = "{objective}"
steps = {STEPS}
global_batch = 2
seq_len = 64
loss_chunk = 64
{init}
[data]
tokenizer = "demo_compact"
{data_key} = "{data}"

[checkpoint]
save_every = 1
keep = 5

[demo]
plot = false
""")
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted SFT and DPO runs (DPO from the SFT run), in this process on one device."""
    tmp = tmp_path_factory.mktemp("posttrain_resume")
    sft_data = tmp / "chat.jsonl"
    sft_data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question: What is {i} plus 2?"},
        {"role": "assistant", "content": f"{i} plus 2 is {i + 2}."}]}) + "\n" for i in range(9)))
    dpo_data = tmp / "pairs.jsonl"
    dpo_data.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"Count from {i}:"}],
        "chosen": f"{i}, {i + 1}, {i + 2}.", "rejected": f"{i}, {i + 2}, {i + 1}."}) + "\n" for i in range(7)))
    mesh = sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])
    out = {"tmp": tmp, "mesh": mesh}
    sft_cfg = _write_config(tmp / "sft.toml", "sft", "sft_files", str(sft_data))
    out["sft"] = (sft_cfg, train(load_train_config(sft_cfg), str(tmp / "sft"), progress=False, log=lambda *_: None,
                                 mesh=mesh))
    dpo_cfg = _write_config(tmp / "dpo.toml", "dpo", "dpo_files", str(dpo_data), init_from=str(tmp / "sft"))
    out["dpo"] = (dpo_cfg, train(load_train_config(dpo_cfg), str(tmp / "dpo"), progress=False, log=lambda *_: None,
                                 mesh=mesh))
    return out


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_killed_run_resumes_exactly(runs, objective):
    config, straight = runs[objective]
    workdir = str(runs["tmp"] / f"{objective}-killed")
    killed = run_train(["--config", config, "--workdir", workdir, "--no-progress"], ONE_DEVICE, kill_at_step=KILL_AT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")
                   if os.path.basename(p).isdigit())
    assert saved and saved[0] == 1 and saved[-1] < KILL_AT, saved   # step 1's checkpoint landed, none past the kill

    logs = []
    resumed = train(load_train_config(config), workdir, progress=False, log=logs.append, mesh=runs["mesh"])
    assert any(line.startswith(f"resumed from {workdir}/checkpoints at step") for line in logs), logs
    if objective == "dpo":   # the reference log-probs stored beside the data by the first run, not recomputed
        assert any(line.startswith("reference log-probs: ") for line in logs), logs
        assert not any("computing reference" in line for line in logs), logs

    def compared(result):
        return [{k: r[k] for k in COMPARED if k in r} for r in read_metrics(result["metrics_path"])]

    want = compared(straight)
    assert [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert compared(resumed) == want   # every step once (the killed run's unsaved steps purged), bit-equal
    assert resumed["last_step"] == STEPS
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"]["params"]),
                 jax.device_get(straight["state"]["params"]))
