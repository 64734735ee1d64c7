"""DPO through the train step: the step's loss and metrics on packed rows (several pairs per row) of a converted tiny
Phi3ForCausalLM against TRL's formulas computed in torch on the same pairs unpacked (with gradient accumulation),
the packed loss equal to one pair per row, one step raising the chosen-vs-rejected margin, and a `train()` run that
precomputes the reference log-probs beside the data (checked against torch),
logs TRL's reward metrics and counts skipped pairs."""

import glob
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import make_tiny_phi3_model, save_phi3_dir
from test_posttrain import torch_dpo_losses

from phi4_jax.checkpoint.hf_convert import hf_to_checkpoint
from phi4_jax.checkpoint.hf_mapping import params_from_hf_state_dict
from phi4_jax.data.sources import DataError
from phi4_jax.data.tokenizing import make_tokenizer
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.posttrain.data import pack_dpo_pairs, packed_ref_logps, read_dpo_pairs
from phi4_jax.posttrain.objectives import dpo_objective, dpo_pair_logps
from phi4_jax.posttrain.reference import load_or_compute_reference
from phi4_jax.train.config import OptimizerConfig, TrainConfigError, build_train_config
from phi4_jax.train.loop import read_metrics, train
from phi4_jax.train.optimizer import make_optimizer
from phi4_jax.train.step import create_train_state, make_train_step, train_state_shardings

SEQ = 160
PAIRS = 6


@pytest.fixture(scope="module")
def tiny():
    hf = make_tiny_phi3_model(seed=7, hidden=48, heads=4, kv_heads=2, layers=2, intermediate=80, vocab=257)
    config = Phi4Config.from_hf_dict(hf.config.to_dict(), compute_dtype="float32", remat_policy="none")
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    return hf, config, jax.tree.map(jnp.asarray, params_from_hf_state_dict(state, config))


@pytest.fixture(scope="module")
def pair_batch():
    """6 pairs, one per row (`read_dpo_pairs`' form): a shared prompt per pair, chosen and rejected completions of
    different lengths, right-padded; at most 50 tokens a side, so 3 pairs pack into a row."""
    rng = np.random.default_rng(0)
    batch = {f"{s}_{k}": np.zeros((PAIRS, SEQ), np.int32) for s in ("chosen", "rejected")
             for k in ("input_ids", "segment_ids", "loss_mask")}
    for i in range(PAIRS):
        prompt = rng.integers(3, 257, int(rng.integers(10, 26)))
        for side in ("chosen", "rejected"):
            completion = rng.integers(3, 257, int(rng.integers(5, 25)))
            n = len(prompt) + len(completion)
            batch[f"{side}_input_ids"][i, :n] = np.concatenate([prompt, completion])
            batch[f"{side}_segment_ids"][i, :n] = 1
            batch[f"{side}_loss_mask"][i, len(prompt):n] = 1
    batch["ref_chosen_logps"] = rng.normal(-1400.0, 30.0, PAIRS).astype(np.float32)
    batch["ref_rejected_logps"] = rng.normal(-1400.0, 30.0, PAIRS).astype(np.float32)
    return batch


def packed(pairs, one_per_row=False):
    """The train step's DPO batch of `pairs`: packed first-fit, or one pair per row (K = 1)."""
    refs = {k: pairs[k] for k in ("ref_chosen_logps", "ref_rejected_logps")}
    rows = {k: v for k, v in pairs.items() if k not in refs}
    if one_per_row:
        out = {k: v for k, v in rows.items()}
        for side in ("chosen", "rejected"):
            out[f"{side}_positions"] = np.arange(SEQ, dtype=np.int32)[None] * out[f"{side}_segment_ids"]
        out["pair_index"] = np.arange(PAIRS, dtype=np.int32)[:, None]
    else:
        out = pack_dpo_pairs(rows)
    return {**{k: v for k, v in out.items() if k != "pair_index"}, **packed_ref_logps(out, refs)}


@pytest.fixture(scope="module")
def packed_batch(pair_batch):
    return packed(pair_batch)


def torch_logps(hf, ids, mask):
    with torch.no_grad():
        logits = hf(torch.as_tensor(ids, dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    tok = torch.gather(logp, 2, torch.as_tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0]
    return (tok * torch.as_tensor(mask[:, 1:], dtype=torch.float64)).sum(1)


def one_step(config, params, batch, objective, *, micro_batches, lr=1e-3):
    mesh = sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimizerConfig(lr=lr, warmup_steps=0, weight_decay=0.0), config, 10)
    shardings = train_state_shardings(mesh, config, tx)
    state = create_train_state(config, tx, shardings, None, params=jax.tree.map(jnp.array, params))
    step = make_train_step(config, tx, schedule, micro_batches=micro_batches, loss_chunk=32, mesh=mesh,
                           shardings=shardings, objective=objective, donate=False)
    return step(state, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.fixture(scope="module")
def sigmoid_step(tiny, packed_batch):
    """One sigmoid-DPO train step on the packed rows, accumulated over 2 micro-batches (a row each)."""
    _, config, params = tiny
    return one_step(config, params, packed_batch, dpo_objective(0.1, "sigmoid"), micro_batches=2)


def trl_reference(hf, b, beta, loss_type, ls):
    """(TRL's mean loss, chosen rewards, rejected rewards) in torch for `b`."""
    pc = torch_logps(hf, b["chosen_input_ids"], b["chosen_loss_mask"])
    pr = torch_logps(hf, b["rejected_input_ids"], b["rejected_loss_mask"])
    rc, rr = (torch.as_tensor(b[k], dtype=torch.float64) for k in ("ref_chosen_logps", "ref_rejected_logps"))
    lengths = {}
    if loss_type == "ipo":   # TRL normalizes ipo by the completion token counts
        lengths = {"lc": torch.as_tensor(b["chosen_loss_mask"].sum(1), dtype=torch.float64),
                   "lr": torch.as_tensor(b["rejected_loss_mask"].sum(1), dtype=torch.float64)}
    loss = torch_dpo_losses(pc, pr, rc, rr, beta, loss_type, ls, **lengths).mean().item()
    return loss, beta * (pc - rc), beta * (pr - rr)


def check_metrics(metrics, loss, chosen_r, rejected_r):
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), chosen_r.mean().item(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), rejected_r.mean().item(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), (chosen_r - rejected_r).mean().item(), rtol=1e-4)
    assert float(metrics["rewards/accuracies"]) == pytest.approx((chosen_r > rejected_r).double().mean().item())


def test_dpo_step_loss_and_metrics_equal_trl_in_torch(tiny, pair_batch, sigmoid_step):
    hf, config, params = tiny
    state, metrics = sigmoid_step
    # TRL's formula over the whole batch: accumulating 2 micro-batches must report the same batch means
    check_metrics(metrics, *trl_reference(hf, pair_batch, 0.1, "sigmoid", 0.0))
    assert float(metrics["tokens"]) == PAIRS
    # tokens/s and MFU count the tokens the forward pass ran on, not the padding
    real = sum(int(pair_batch[f"{side}_segment_ids"].sum()) for side in ("chosen", "rejected"))
    assert float(metrics["batch_tokens"]) == real
    # the step's update moves the policy toward the chosen completions: the mean margin grows
    logps = jax.jit(dpo_pair_logps, static_argnums=(1, 3))
    jb = {k: jnp.asarray(v) for k, v in pair_batch.items()}
    before = np.subtract(*map(np.asarray, logps(params, config, jb, 32)))
    after = np.subtract(*map(np.asarray, logps(state["params"], config, jb, 32)))
    assert after.mean() > before.mean() + 1.0, (before, after)


@pytest.mark.parametrize("loss_type,ls", [("robust", 0.1), ("ipo", 0.0)])
def test_dpo_objective_loss_types_equal_trl_in_torch(tiny, pair_batch, packed_batch, loss_type, ls):
    hf, config, params = tiny
    objective = dpo_objective(0.2, loss_type, ls)
    total, count, sums = jax.jit(objective.loss, static_argnums=(2, 3))(
        params, {k: jnp.asarray(v) for k, v in packed_batch.items()}, config, 32)
    check_metrics({"loss": total / count, **{k: v / count for k, v in sums.items()}},
                  *trl_reference(hf, pair_batch, 0.2, loss_type, ls))


def torch_chosen_nll(hf, b):
    """TRL 1.16's "sft" loss term (rpo_alpha's NLL): -chosen_per_token_logps[chosen_mask].mean() over the batch."""
    with torch.no_grad():
        logits = hf(torch.as_tensor(b["chosen_input_ids"], dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    tok = torch.gather(logp, 2, torch.as_tensor(b["chosen_input_ids"][:, 1:], dtype=torch.long)[..., None])[..., 0]
    return -tok[torch.as_tensor(b["chosen_loss_mask"][:, 1:]).bool()].mean().item()


def test_rpo_alpha_adds_trls_chosen_nll(tiny, pair_batch, packed_batch):
    """dpo.rpo_alpha: the loss is TRL's sigmoid loss + alpha x the mean NLL of the batch's chosen tokens (chosen
    completions of different lengths, so a per-pair mean or a sum would not match)."""
    hf, config, params = tiny
    alpha = 0.7
    total, count, sums = jax.jit(dpo_objective(0.1, "sigmoid", rpo_alpha=alpha).loss, static_argnums=(2, 3))(
        params, {k: jnp.asarray(v) for k, v in packed_batch.items()}, config, 32)
    dpo, chosen_r, rejected_r = trl_reference(hf, pair_batch, 0.1, "sigmoid", 0.0)
    nll = torch_chosen_nll(hf, pair_batch)
    metrics = {"loss": total / count, **{k: v / count for k, v in sums.items()}}
    check_metrics(metrics, dpo + alpha * nll, chosen_r, rejected_r)
    np.testing.assert_allclose(float(metrics["nll/chosen"]), nll, rtol=1e-4)


def test_packed_dpo_loss_equals_one_pair_per_row(tiny, pair_batch, packed_batch):
    _, config, params = tiny
    rows, slots = packed_batch["pair_mask"].shape
    assert rows == 2 and slots >= 3 and packed_batch["pair_mask"].sum() == PAIRS   # packing happened
    assert np.unique(packed_batch["chosen_segment_ids"]).tolist() == list(range(slots + 1))
    loss = jax.jit(dpo_objective(0.1, "ipo").loss, static_argnums=(2, 3))
    got = loss(params, {k: jnp.asarray(v) for k, v in packed_batch.items()}, config, 32)
    want = loss(params, {k: jnp.asarray(v) for k, v in packed(pair_batch, one_per_row=True).items()}, config, 32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got, want)


PAIR_ROWS = [
    {"prompt": [{"role": "user", "content": f"Question: What is {a} plus {b}?"}],
     "chosen": f"{a} plus {b} is {a + b}.", "rejected": f"{a} plus {b} is {a + b + 1}."}
    for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 0), (4, 4)]
]


def dpo_config(data, init_from, **dpo):
    return build_train_config({
        "model": {"preset": "tiny", "vocab_size": 256, "hidden_size": 48, "intermediate_size": 80,
                  "num_heads": 4, "num_kv_heads": 2, "head_dim": 12, "max_position_embeddings": 64,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},   # the tiny HF model's
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"objective": "dpo", "steps": 2, "global_batch": 3, "seq_len": 64, "loss_chunk": 64,   # rows
                  "init_from": init_from},
        "data": {"tokenizer": "demo_compact", "dpo_files": data},
        "checkpoint": {"save_every": 2, "async_save": False},
        "dpo": dpo,
    })


def test_dpo_train_run_precomputes_reference_and_logs_rewards(tmp_path):
    hf = make_tiny_phi3_model(seed=11, hidden=48, heads=4, kv_heads=2, layers=2, intermediate=80, vocab=256,
                              max_position_embeddings=64)
    save_phi3_dir(hf, tmp_path / "hf", fmt="safetensors")
    hf_to_checkpoint(tmp_path / "hf", tmp_path / "ref", progress=False)
    rows = list(PAIR_ROWS)
    rows.insert(2, dict(PAIR_ROWS[0], rejected=PAIR_ROWS[0]["chosen"]))                    # line 3: no preference
    rows.insert(4, dict(PAIR_ROWS[1], chosen=", ".join(map(str, range(40)))))   # line 5: too long
    data = tmp_path / "dpo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dpo_config(str(data), str(tmp_path / "ref"))
    logs = []
    mesh = sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])
    train(cfg, str(tmp_path / "run"), progress=False, log=logs.append, mesh=mesh)
    text = "\n".join(logs)
    assert "kept 6, skipped 2" in text and f"{data}:3" in text and "chosen equals rejected" in text
    assert f"{data}:5" in text and "longer than train.seq_len 64" in text
    # the stored reference log-probs are the reference model's, in data order (torch is the peer)
    [ref_file] = glob.glob(f"{data}.ref_logps-*.npz")
    pairs, _ = read_dpo_pairs(str(data), make_tokenizer(cfg.data), 64, progress=False)
    stored = np.load(ref_file)
    for side in ("chosen", "rejected"):
        want = torch_logps(hf, pairs[f"{side}_input_ids"], pairs[f"{side}_loss_mask"]).numpy()
        np.testing.assert_allclose(stored[f"ref_{side}_logps"], want, rtol=1e-4)
    m = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(m[0])
    # step 1's policy is the reference: every reward is 0 and the sigmoid loss is log 2
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5) and m[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    # each step is all 6 pairs (2 a row, 3 rows): after one step the policy prefers their chosen completions
    assert m[0]["tokens"] == m[1]["tokens"] == 6 and m[1]["rewards/margins"] > 0
    # the next run finds the stored file instead of recomputing it (no reference model is loaded)
    logs.clear()
    got = load_or_compute_reference(cfg, pairs, mesh, None, log=logs.append, progress=False)
    assert logs == [f"reference log-probs: {ref_file}"]
    np.testing.assert_array_equal(got["ref_chosen_logps"], stored["ref_chosen_logps"])


def test_dpo_bad_input(tmp_path):
    with pytest.raises(TrainConfigError, match="dpo.loss_type: unknown DPO loss type 'hinge'"):
        dpo_config("x.jsonl", None, loss_type="hinge")
    with pytest.raises(TrainConfigError, match="dpo.rpo_alpha must be a number >= 0, got -1"):
        dpo_config("x.jsonl", None, rpo_alpha=-1)
    with pytest.raises(TrainConfigError, match="needs data.dpo_files"):
        build_train_config({"train": {"objective": "dpo"}, "data": {"sources": []}})
    tok = make_tokenizer(dpo_config("x", None).data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIR_ROWS[0]) + "\n" + json.dumps({"prompt": PAIR_ROWS[0]["prompt"], "chosen": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: 'chosen' must be a string"):
        read_dpo_pairs(str(bad), tok, 64, progress=False)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps(dict(PAIR_ROWS[0], rejected=PAIR_ROWS[0]["chosen"])) + "\n")
    with pytest.raises(DataError, match=r"no usable pair(.|\n)*same\.jsonl:1"):
        read_dpo_pairs(str(same), tok, 64, progress=False)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(PAIR_ROWS[0]) + "\n")
    mesh = sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])
    with pytest.raises(DataError, match="DPO needs a reference model: set train.init_from"):
        train(dpo_config(str(ok), None), str(tmp_path / "run"), progress=False, log=lambda *_: None, mesh=mesh)


def test_open_assistant_turn_and_token_pairs_are_continued(tmp_path):
    """A prompt ending in an assistant message is continued without <|im_end|> (Pivotal Token Search's pairs);
    token-level pairs are taken as they are."""
    tok = make_tokenizer(dpo_config("x", None).data)
    phi4 = tok.tokenizer
    prefix = [{"role": "user", "content": "Question: What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2"}]
    rows = [{"prompt": prefix, "chosen": " is", "rejected": " plus"},
            {"prompt_ids": phi4.encode("<|im_start|>user<|im_sep|>Count from 3:<|im_end|>"),
             "chosen_ids": phi4.encode_ordinary(" 3"), "rejected_ids": phi4.encode_ordinary(" 4")}]
    path = tmp_path / "pts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, report = read_dpo_pairs(str(path), tok, 64, progress=False)
    assert report.kept == 2
    ids, mask = pairs["chosen_input_ids"][0], pairs["chosen_loss_mask"][0]
    n = int(pairs["chosen_segment_ids"][0].sum())
    want_prompt = "<|im_start|>user<|im_sep|>Question: What is 2 plus 2?<|im_end|><|im_start|>assistant<|im_sep|>2 plus 2"
    np.testing.assert_array_equal(ids[:n], tok.from_phi4_ids(phi4.encode(want_prompt + " is")))
    np.testing.assert_array_equal(mask[:n], [0] * (n - 1) + [1])
    ids1, n1 = pairs["rejected_input_ids"][1], int(pairs["rejected_segment_ids"][1].sum())
    np.testing.assert_array_equal(ids1[:n1], tok.from_phi4_ids(rows[1]["prompt_ids"] + rows[1]["rejected_ids"]))
