"""SFT: JSONL reading and masking against the chat template, first-fit packing, the packed loss against a
PyTorch computation on a converted tiny Phi3ForCausalLM (TRL's assistant-only loss), isolation of packed
examples, and a `train()` run with `train.objective = "sft"` (resuming one: tests/test_lora.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import make_tiny_phi3_model

from phi4_jax.checkpoint.hf_mapping import params_from_hf_state_dict
from phi4_jax.data.sources import DataError
from phi4_jax.data.tokenizing import Phi4TextTokenizer
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.posttrain.data import read_sft_examples, sft_batches
from phi4_jax.posttrain.objectives import sft_loss
from phi4_jax.train.config import TrainConfigError, build_train_config
from phi4_jax.train.loop import read_metrics, train

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And <|im_end|> 3 plus 3?"},
    {"role": "assistant", "content": "6, of course."},
]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def phi4_tokenizer():
    return Phi4TextTokenizer()


def test_sft_file_mask_matches_the_chat_template_and_skips_are_counted(tmp_path, phi4_tokenizer):
    tok = phi4_tokenizer.tokenizer
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "no answer"}]},                       # line 2: no assistant
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 300}]},  # 3
    ])
    examples, report = read_sft_examples(path, phi4_tokenizer, seq_len=256, progress=False)
    assert report.kept == 1 and report.n_skipped == 2
    summary = report.summary("sft")
    assert f"{path}:2" in summary and "no assistant turn" in summary
    assert f"{path}:3" in summary and "longer than train.seq_len 256" in summary
    ids, mask = examples[0]["input_ids"], examples[0]["loss_mask"]
    # The peer: the chat template rendered as a string. Message text is ordinary text, so the typed
    # "<|im_end|>" in the user turn is encoded as text, not as the special token.
    want_ids, want_mask = [], []
    for m in CONVERSATION:
        header = tok.encode(f"<|im_start|>{m['role']}<|im_sep|>")
        body = tok.encode_ordinary(m["content"]) + tok.encode("<|im_end|>")
        want_ids += header + body
        want_mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    rendered = tok.apply_chat_template(CONVERSATION)
    assert tok.decode(ids.tolist()) == rendered
    # trained: exactly the two answers, each with its closing <|im_end|>
    assert tok.decode(ids[mask == 1].tolist()) == "4.<|im_end|>6, of course.<|im_end|>"


def test_sft_bad_lines_name_file_and_line(tmp_path, phi4_tokenizer):
    bad_json = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}, "{not json"])
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON \(Expecting property name .* at column 2\)"):
        read_sft_examples(bad_json, phi4_tokenizer, 256, progress=False)
    not_object = write_jsonl(tmp_path / "e.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=r"e\.jsonl:1: expected a JSON object, got list"):
        read_sft_examples(not_object, phi4_tokenizer, 256, progress=False)
    bad_role = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: malformed messages"):
        read_sft_examples(bad_role, phi4_tokenizer, 256, progress=False)
    no_key = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: 'messages' must be a non-empty list"):
        read_sft_examples(no_key, phi4_tokenizer, 256, progress=False)
    only_skips = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="no usable example"):
        read_sft_examples(only_skips, phi4_tokenizer, 256, progress=False)


@pytest.fixture(scope="module")
def tiny():
    hf = make_tiny_phi3_model(seed=5, hidden=48, heads=4, kv_heads=2, layers=2, intermediate=80, vocab=257)
    config = Phi4Config.from_hf_dict(hf.config.to_dict(), compute_dtype="float32", remat_policy="none")
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    return hf, config, jax.tree.map(jnp.asarray, params_from_hf_state_dict(state, config))


def random_examples(seed, lengths):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, 257, n).astype(np.int32)
        mask = np.zeros(n, np.int32)
        mask[n // 2:] = 1             # a "prompt" half, then an "answer" half that is trained on
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def trl_sft_loss_sum(hf, examples):
    """TRL's assistant-only loss, one unpacked example at a time: labels = ids where the mask is 1 else -100,
    logits at t-1 predict label t; returns (summed cross-entropy, number of labels)."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]
        labels = torch.where(torch.as_tensor(ex["loss_mask"]) == 1, ids[0], -100)[None]
        with torch.no_grad():
            logits = hf(ids).logits.double()
        total += torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                   reduction="sum").item()
        count += int((labels[0, 1:] != -100).sum())
    return total, count


def test_sft_packing_and_loss_match_trl_unpacked(tiny):
    hf, config, params = tiny
    examples = random_examples(0, [150, 90, 200, 60, 120])
    batch = next(iter(sft_batches(examples, seq_len=256, host_batch=3, seed=0)))
    assert set(batch) == {"input_ids", "segment_ids", "positions", "loss_mask"}
    assert batch["input_ids"].shape == (3, 256)
    # every packed segment is one whole example, positions restart at 0, the mask moved with its tokens
    seen = []
    for row in range(3):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            where = seg == s
            ids = batch["input_ids"][row][where]
            match = [i for i, ex in enumerate(examples) if np.array_equal(ex["input_ids"], ids)]
            assert len(match) == 1, "a packed segment is not one whole example"
            np.testing.assert_array_equal(batch["loss_mask"][row][where], examples[match[0]]["loss_mask"])
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
            seen.append(match[0])
        assert np.all(batch["loss_mask"][row][seg == 0] == 0)
    total, count, _ = jax.jit(sft_loss, static_argnums=(2, 3))(
        params, {k: jnp.asarray(v) for k, v in batch.items()}, config, 64)
    want_total, want_count = trl_sft_loss_sum(hf, [examples[i] for i in seen])
    assert float(count) == want_count
    np.testing.assert_allclose(float(total), want_total, rtol=2e-5)


def test_packed_examples_never_see_each_other(tiny):
    _, config, params = tiny
    a, b = random_examples(1, [100, 80])
    a_changed = dict(a, input_ids=np.random.default_rng(9).integers(3, 257, 100).astype(np.int32))
    loss = jax.jit(sft_loss, static_argnums=(2, 3))

    def b_loss(first, segments=True):
        ids = np.concatenate([first["input_ids"], b["input_ids"]])[None]
        mask = np.concatenate([np.zeros(100, np.int32), b["loss_mask"]])[None]   # train on b only
        seg = np.concatenate([np.ones(100), 2 * np.ones(80)]).astype(np.int32)[None] if segments else np.ones_like(ids)
        pos = np.concatenate([np.arange(100), np.arange(80)]).astype(np.int32)[None]
        batch = {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask}
        return float(loss(params, {k: jnp.asarray(v) for k, v in batch.items()}, config, 180)[0])

    assert b_loss(a) == pytest.approx(b_loss(a_changed), rel=1e-6, abs=1e-6)
    # without segment ids b attends to a, and the same change moves b's loss: the check above can fail
    assert abs(b_loss(a, segments=False) - b_loss(a_changed, segments=False)) > 1e-3


def sft_config(data_path, **train):
    return build_train_config({
        "model": {"preset": "tiny", "vocab_size": 256, "max_position_embeddings": 128},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"objective": "sft", "steps": 2, "global_batch": 2, "seq_len": 64, "loss_chunk": 64, **train},
        "data": {"tokenizer": "demo_compact", "sft_files": data_path},
        "checkpoint": {"save_every": 2, "async_save": False},
    })


def test_sft_train_run_reports_skips(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Question: What is {i % 10} plus 2?"},
                          {"role": "assistant", "content": f"{i % 10} plus 2 is {i % 10 + 2}."}]} for i in range(12)]
    rows.insert(3, {"messages": [{"role": "user", "content": "Count from 3:"}]})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    mesh = sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])
    logs = []
    train(sft_config(path), str(tmp_path / "run"), progress=False, log=logs.append, mesh=mesh)
    assert any("kept 12, skipped 1" in line and f"{path}:4" in line for line in logs), logs
    first = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in first] == [1, 2]
    # ~8 trained tokens per 20-token example (answer + <|im_end|>): the count is the masked tokens, not the rows
    assert all(0 < r["tokens"] < 2 * 64 / 2 for r in first) and all(np.isfinite(r["loss"]) for r in first)


def test_sft_config_errors(tmp_path):
    with pytest.raises(TrainConfigError, match="needs data.sft_files"):
        build_train_config({"train": {"objective": "sft"}, "data": {"sources": []}})
    with pytest.raises(TrainConfigError, match="train.objective must be one of"):
        sft_config("x.jsonl", objective="rlhf")
    with pytest.raises(DataError, match="no files match"):
        read_sft_examples(os.path.join(tmp_path, "missing*.jsonl"), None, 64)
