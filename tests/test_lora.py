"""LoRA: the weight object at `phi4_jax.model.linear` against the dense product written in NumPy, merged logits
equal adapter logits, and a LoRA SFT run (only adapters trained and given optimizer state, base frozen) merged by
`python -m phi4_jax.posttrain.merge_lora`, exported with `convert_weights.py --to-hf`, and loaded by transformers
with the adapter model's logits."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from phi4_jax.checkpoint.hf_convert import checkpoint_to_hf
from phi4_jax.checkpoint.load import load_model
from phi4_jax.model import sharding
from phi4_jax.model.config import get_preset
from phi4_jax.model.decoder import forward
from phi4_jax.model.linear import linear
from phi4_jax.posttrain.lora import LoraWeight, adapter_specs, attach, init_adapters, merge_params, restore_lora_run
from phi4_jax.posttrain.merge_lora import merge_main
from phi4_jax.train.checkpoints import TrainCheckpointer, TrainCheckpointError, _DataIteratorState
from phi4_jax.train.config import TrainConfigError, build_train_config
from phi4_jax.train.loop import read_metrics, train
from phi4_jax.train.step import init_params

CFG = get_preset("tiny", vocab_size=256, max_position_embeddings=256)
logits_of = jax.jit(forward, static_argnums=2)


@pytest.mark.parametrize("equation,x_shape,w_in,w_out", [
    ("bse,ehd->bshd", (2, 5, 8), (8,), (3, 4)),      # q/k/v
    ("bshd,hde->bse", (2, 5, 3, 4), (3, 4), (8,)),   # o
    ("bsf,fe->bse", (2, 5, 6), (6,), (8,)),          # down
])
def test_lora_weight_product_equals_dense_update(equation, x_shape, w_in, w_out):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape)
    w = rng.normal(size=w_in + w_out)
    a = rng.normal(size=w_in + (2,))
    b = rng.normal(size=(2,) + w_out)
    scale = 1.5
    got = linear(equation, jnp.asarray(x, jnp.float32),
                 LoraWeight(*(jnp.asarray(t, jnp.float32) for t in (w, a, b)), scale), jnp.float32)
    dense = w + scale * np.tensordot(a, b, axes=1)     # float64 NumPy: W + s * A @ B
    want = np.einsum(equation, x, dense)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_merged_logits_equal_adapter_logits():
    base = init_params(CFG, jax.random.key(0))
    adapters = init_adapters(CFG, 4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                             jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (2, 64), 0, CFG.vocab_size)
    base_logits = logits_of(base, ids, CFG)
    # a fresh adapter (B = 0) is the identity
    np.testing.assert_array_equal(logits_of(attach(base, adapters, 4.0), ids, CFG), base_logits)
    adapters = jax.tree.map(lambda t: t + 0.05 * jax.random.normal(jax.random.key(3), t.shape), adapters)
    adapted = logits_of(attach(base, adapters, 4.0), ids, CFG)
    merged = logits_of(merge_params(base, adapters, 4.0), ids, CFG)
    assert float(jnp.max(jnp.abs(adapted - base_logits))) > 1e-2     # the adapters do change the model
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)


def test_adapter_shapes_keep_the_layers_axis_first():
    specs = adapter_specs(CFG, 8, ("q_proj", "o_proj"))["layers"]
    L, d, h, hd = CFG.num_layers, CFG.hidden_size, CFG.num_heads, CFG.head_dim
    assert specs["q_proj"]["a"] == ((L, d, 8), ("layers", "embed", None))
    assert specs["q_proj"]["b"] == ((L, 8, h, hd), ("layers", None, "q_heads", "head_dim"))
    assert specs["o_proj"]["a"] == ((L, h, hd, 8), ("layers", "q_heads", "head_dim", None))
    with pytest.raises(ValueError, match="lora.targets must be"):
        adapter_specs(CFG, 8, ("lm_head",))


def lora_config(data, steps=2, seed=0, **lora):
    return build_train_config({   # the demo tokenizer's ids (pad 0, <|endoftext|> 1), which transformers checks
        "model": {"preset": "tiny", "vocab_size": 256, "max_position_embeddings": 256, "pad_token_id": 0,
                  "bos_token_id": 1, "eos_token_id": 1},
        "optimizer": {"lr": 1e-2, "warmup_steps": 0, "decay_steps": 10},   # the same lr whatever train.steps
        "train": {"objective": "sft", "steps": steps, "seed": seed, "global_batch": 2, "seq_len": 64, "loss_chunk": 64},
        "data": {"tokenizer": "demo_compact", "sft_files": data},
        "checkpoint": {"save_every": 1, "async_save": False},
        "lora": {"rank": 4, "alpha": 8.0, "base_dtype": "float32", **lora},
    })


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _save_with_the_base(self, step, state, data_iterator, *, force=False, base_reference=None):
    """`TrainCheckpointer.save` as it was before LoRA checkpoints left out their frozen base."""
    if not force and not self.due(step):
        return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(_DataIteratorState(data_iterator)))
    return self.manager.save(step, args=args, force=True)


def test_lora_sft_run_merges_and_exports_to_transformers(tmp_path, monkeypatch):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question: What is {i} plus 1?"},
        {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]}) + "\n" for i in range(10)))
    cfg = lora_config(str(data))
    mesh = sharding.build_mesh("fsdp=1", devices=jax.devices()[:1])
    quiet = dict(progress=False, log=lambda *_: None, mesh=mesh)
    train(cfg, str(tmp_path / "run"), **quiet)
    # the checkpoint holds the adapters and their AdamW moments, not the (float32 here) base weights
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(init_params(cfg.model, jax.random.key(0))))
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(init_adapters(cfg.model, 4, cfg.lora.targets,
                                                                         jax.random.key(0))))
    saved = _dir_bytes(tmp_path / "run" / "checkpoints" / "2" / "state")
    assert 3 * adapter_bytes <= saved < 3 * adapter_bytes + base_bytes // 4, (saved, adapter_bytes, base_bytes)
    logs = []   # resume to step 3: adapters, their AdamW moments and the step restore; the base is reloaded
    out = train(lora_config(str(data), steps=3), str(tmp_path / "run"), progress=False, log=logs.append, mesh=mesh)
    assert out["last_step"] == 3 and any("resumed" in line and "step 2" in line for line in logs), logs
    # the resumed step 3 has the loss of an uninterrupted 3-step run, which saves as versions before adapters-only
    # checkpoints did (the whole state, base included, and no base reference)
    monkeypatch.setattr(TrainCheckpointer, "save", _save_with_the_base)
    train(lora_config(str(data), steps=3), str(tmp_path / "straight"), **quiet)
    monkeypatch.undo()
    resumed, straight = (read_metrics(str(tmp_path / d / "metrics.jsonl"))[-1] for d in ("run", "straight"))
    assert resumed["step"] == straight["step"] == 3
    np.testing.assert_allclose(resumed["loss"], straight["loss"], rtol=1e-6)
    # resuming that checkpoint is refused by name, not by Orbax's tree-structure mismatch
    with pytest.raises(TrainCheckpointError, match=r"checkpoint step 3 in .*straight/checkpoints has no reference "
                       r"to its LoRA base weights \(saved by an older version that stored the base itself"):
        train(lora_config(str(data), steps=4), str(tmp_path / "straight"), **quiet)
    state = out["state"]
    # only the adapters are trained and carry AdamW moments; the base is frozen
    assert set(state["params"]["layers"]) == set(cfg.lora.targets)
    n_adapter = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert n_opt == 2 * n_adapter   # Adam's two moments over the adapters, nothing over the base
    fresh = init_params(cfg.model, jax.random.fold_in(jax.random.key(cfg.train.seed), 1))
    # (jit vs eager init differ by float rounding only; one AdamW step at lr 1e-2 would move weights by ~1e-2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), state["frozen"], fresh)
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))]
    assert losses[-1] < losses[0]
    # merge -> plain checkpoint -> logits equal the adapter model's
    assert merge_main([str(tmp_path / "run"), str(tmp_path / "merged"), "--no-progress"]) == 0
    _, base, adapters = restore_lora_run(str(tmp_path / "run"), mesh=mesh)
    assert float(jnp.max(jnp.abs(adapters["layers"]["q_proj"]["b"]))) > 0   # training moved B off zero
    ids = np.random.default_rng(0).integers(0, 256, (1, 200)).astype(np.int32)
    adapted = np.asarray(logits_of(attach(base, adapters, cfg.lora.scale), jnp.asarray(ids), cfg.model))
    merged_model = load_model(str(tmp_path / "merged"), dtype="float32")
    np.testing.assert_allclose(np.asarray(merged_model(jnp.asarray(ids))), adapted, rtol=1e-5, atol=1e-5)
    # --to-hf gives a normal transformers checkpoint with the same logits
    checkpoint_to_hf(tmp_path / "merged", tmp_path / "hf", progress=False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(hf_logits, adapted, rtol=1e-4, atol=1e-4)
    # another base (here another seed's init) is refused on resume, and the run's config.json stays as it was
    saved_config = (tmp_path / "run" / "config.json").read_bytes()
    with pytest.raises(TrainCheckpointError, match="trained on base weights .* now gives different weights"):
        train(lora_config(str(data), steps=4, seed=1), str(tmp_path / "run"),
              allow_config_change=True, **quiet)
    assert (tmp_path / "run" / "config.json").read_bytes() == saved_config


def test_lora_config_errors():
    with pytest.raises(TrainConfigError, match="lora.targets must be"):
        lora_config("x.jsonl", targets=["lm_head"])
    with pytest.raises(TrainConfigError, match="lora.rank must be an integer"):
        lora_config("x.jsonl", rank=-1)
    with pytest.raises(TrainConfigError, match="lora.base_dtype"):
        lora_config("x.jsonl", base_dtype="int8")
