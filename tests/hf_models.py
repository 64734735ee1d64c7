"""Test helper: tiny random transformers `Phi3ForCausalLM` checkpoints on disk, in every input format.

`make_tiny_phi3_dir` builds a seeded random model (weights drawn with a large `init_scale`, so logits are not
flat, and norm weights perturbed away from 1, so a swapped or dropped norm shows) and saves it as

- ``"safetensors-sharded"``: several ``model-0000N-of-0000M.safetensors`` plus ``model.safetensors.index.json``;
- ``"safetensors"``: one ``model.safetensors`` and no index;
- ``"bin"``: one ``pytorch_model.bin`` (``torch.save`` of the state dict);
- ``"bin-sharded"``: ``pytorch_model-0000N-of-0000M.bin`` plus ``pytorch_model.bin.index.json``;
- ``"pt"``: one ``model.pt``.

``config_style`` picks the config.json: ``"transformers"`` (what transformers 5 writes: ``rope_parameters``)
or ``"phi4"`` (microsoft/phi-4's published style: top-level ``rope_theta``, ``rope_scaling: null``,
``torch_dtype``). ``phi4_style_config=True`` is shorthand for ``config_style="phi4"``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

FORMATS = ("safetensors-sharded", "safetensors", "bin", "bin-sharded", "pt")


def tiny_phi3_config(*, hidden=72, heads=6, kv_heads=2, layers=2, intermediate=136, vocab=311,
                     rope_theta=10000.0, init_scale=0.15, max_position_embeddings=4096):
    """A transformers `Phi3Config` for a tiny model (defaults: odd sizes, 3:1 GQA)."""
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, initializer_range=init_scale,
        max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )


def make_tiny_phi3_model(*, seed=0, init_scale=0.15, dtype="float32", **config_kwargs):
    """A seeded random `Phi3ForCausalLM` in eval mode (weights in `dtype`)."""
    import torch
    from transformers import Phi3ForCausalLM

    config = tiny_phi3_config(init_scale=init_scale, **config_kwargs)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm weights start at 1; make them matter
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    model = model.to(getattr(torch, dtype)).eval()
    return model


def _phi4_style_config_dict(model) -> dict:
    """config.json as microsoft/phi-4 publishes it (top-level rope_theta, rope_scaling null)."""
    c = model.config
    return {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "embd_pdrop": 0.0,
        "eos_token_id": c.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": c.initializer_range,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "phi3",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "original_max_position_embeddings": c.original_max_position_embeddings,
        "pad_token_id": c.pad_token_id,
        "resid_pdrop": 0.0,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": c.rope_parameters["rope_theta"],
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "transformers_version": "4.47.0",
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }


def _torch_shards(state_dict: dict, n: int) -> list[dict]:
    names = list(state_dict)
    per = math.ceil(len(names) / n)
    return [{k: state_dict[k] for k in names[i:i + per]} for i in range(0, len(names), per)]


def save_phi3_dir(model, path, *, fmt="safetensors-sharded", config_style="transformers", num_shards=3):
    """Saves `model` to directory `path` in format `fmt` (see module docstring). Returns the Path."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; choose one of {FORMATS}")
    if config_style not in ("transformers", "phi4"):
        raise ValueError(f"unknown config_style {config_style!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if fmt == "safetensors-sharded":
        model.save_pretrained(path, max_shard_size=max(1, total // num_shards + 1))
        if not (path / "model.safetensors.index.json").exists():
            raise RuntimeError("save_pretrained wrote a single shard; lower max_shard_size")
    elif fmt == "safetensors":
        model.save_pretrained(path, max_shard_size=10 * total + (1 << 20))
        assert (path / "model.safetensors").exists()
    else:
        model.config.save_pretrained(path)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if fmt == "bin":
            torch.save(state, path / "pytorch_model.bin")
        elif fmt == "pt":
            torch.save(state, path / "model.pt")
        else:  # bin-sharded
            shards = _torch_shards(state, num_shards)
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
                torch.save(shard, path / fname)
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    if config_style == "phi4":
        (path / "config.json").write_text(json.dumps(_phi4_style_config_dict(model), indent=2))
    gen_cfg = path / "generation_config.json"
    if gen_cfg.exists():
        os.remove(gen_cfg)  # not part of what the converter reads; keep the dirs minimal
    return path


def make_tiny_phi3_dir(path, *, hidden=72, heads=6, kv_heads=2, layers=2, intermediate=136, vocab=311,
                       fmt="safetensors-sharded", phi4_style_config=False, config_style=None,
                       rope_theta=None, seed=0, init_scale=0.15, dtype="float32",
                       max_position_embeddings=4096, num_shards=3):
    """Builds a tiny random Phi3ForCausalLM and saves it to `path`. Returns (Path, hf_model in eval mode).

    `rope_theta` defaults to 250000 for a phi-4-style config (like microsoft/phi-4) and 10000 otherwise.
    """
    style = config_style or ("phi4" if phi4_style_config else "transformers")
    if rope_theta is None:
        rope_theta = 250000.0 if style == "phi4" else 10000.0
    model = make_tiny_phi3_model(
        seed=seed, init_scale=init_scale, dtype=dtype, hidden=hidden, heads=heads, kv_heads=kv_heads,
        layers=layers, intermediate=intermediate, vocab=vocab, rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings)
    out = save_phi3_dir(model, path, fmt=fmt, config_style=style, num_shards=num_shards)
    return out, model


def convert_tiny_phi3(root, *, seed=0, **kwargs):
    """A tiny random Phi3ForCausalLM saved by transformers under root/"hf" (one safetensors file) and converted
    with the real `convert_weights.py` CLI into root/"ckpt". Returns (checkpoint Path, hf_model in eval mode)."""
    import subprocess
    import sys

    root = Path(root)
    hf_dir, hf_model = make_tiny_phi3_dir(root / "hf", fmt="safetensors", seed=seed, **kwargs)
    dst = root / "ckpt"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(repo, "convert_weights.py"), str(hf_dir), str(dst)],
                          capture_output=True, text=True, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dst, hf_model


def hf_logits(model, input_ids, position_ids=None):
    """float32 logits of a transformers model for int input ids [B, S] (NumPy in, NumPy out); `position_ids`
    [B, S] (default 0..S-1) go to the model's `position_ids`."""
    import numpy as np
    import torch

    kwargs = {} if position_ids is None else {"position_ids": torch.as_tensor(np.asarray(position_ids),
                                                                              dtype=torch.long)}
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long), **kwargs).logits
    return out.float().numpy()
