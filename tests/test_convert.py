"""convert_weights.py and phi4_jax.checkpoint: formats, round trips, dtypes, Orbax compatibility, bad inputs.

Peer: tiny random transformers Phi3ForCausalLM checkpoints (tests/hf_models.py): converted parameters are
compared with slices of the HF tensors indexed by hand in `assert_params_are_hf_slices` (never with the
converter's own mapping), each source format's converted model is compared with transformers' logits, and
`transformers.AutoModelForCausalLM` loads what `--to-hf` writes. Two small forward programs of ours are
compiled (one per rope_theta of the format test); test_parity.py has the larger logit-parity cases.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hf_models import FORMATS, hf_logits, make_tiny_phi3_dir

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / "convert_weights.py")


def run_cli(*args, check=True):
    """Runs convert_weights.py in a subprocess (the real CLI)."""
    proc = subprocess.run([sys.executable, CLI, "--no-progress", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"convert_weights.py failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def cli_main(*args):
    """Runs the CLI's main() in-process (cheaper than a subprocess for the many error cases)."""
    import convert_weights
    return convert_weights.main(["--no-progress", *map(str, args)])


def hf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a HF dir written as safetensors (bf16 as ml_dtypes.bfloat16), via the safetensors lib."""
    from safetensors import safe_open

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                out[name] = torch_to_numpy(st.get_tensor(name))
    return out


def torch_to_numpy(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def model_state(model) -> dict[str, np.ndarray]:
    return {k: torch_to_numpy(v.detach().clone()) for k, v in model.state_dict().items()}


def no_leftovers(parent: Path, name: str) -> bool:
    """Neither the destination nor any temporary directory for it exists in `parent`."""
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


def restored_params(path):
    from phi4_jax.checkpoint.load import restore_params
    return restore_params(path)


def assert_params_are_hf_slices(ours, hf: dict[str, np.ndarray], *, dtype=None):
    """Every converted parameter equals the HF tensor it comes from, indexed by hand here (PHI4.md's layout:
    nn.Linear weights are [out, in]; qkv_proj rows are q heads, then k heads, then v heads, each head_dim rows;
    gate_up_proj rows are gate, then up), cast to `dtype` (default: the HF tensor's). Written independently of
    phi4_jax.checkpoint.hf_mapping, so a mapping mistake made the same way in both directions cannot pass.
    The sizes come from the HF tensors and the converted q_proj's head count."""
    import jax

    def cast(x):
        return np.asarray(x).astype(dtype) if dtype is not None else np.asarray(x)

    def same(got, want, what):
        got, want = np.asarray(got), cast(want)
        assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        assert np.array_equal(got, want), what

    layers = ours["layers"]
    n_layers, hidden, n_heads, head_dim = np.shape(layers["q_proj"])
    n_kv = np.shape(layers["k_proj"])[2]
    ffn = hf["model.layers.0.mlp.down_proj.weight"].shape[1]
    want_keys = {"embed", "final_norm", "lm_head"} | {
        "layers/" + n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "attn_norm", "mlp_norm")}
    got_keys = {"/".join(str(getattr(k, "key", k)) for k in path)
                for path, _ in jax.tree_util.tree_flatten_with_path(ours)[0]}
    assert got_keys == want_keys, got_keys ^ want_keys
    assert n_layers == sum(1 for n in hf if n.endswith("self_attn.qkv_proj.weight"))

    same(ours["embed"], hf["model.embed_tokens.weight"], "embed")
    same(ours["lm_head"], hf["lm_head.weight"].T, "lm_head")
    same(ours["final_norm"], hf["model.norm.weight"], "final_norm")
    for i in range(n_layers):
        p = f"model.layers.{i}."
        qkv = hf[p + "self_attn.qkv_proj.weight"]
        assert qkv.shape == ((n_heads + 2 * n_kv) * head_dim, hidden)
        for h in range(n_heads):
            same(layers["q_proj"][i][:, h, :], qkv[h * head_dim:(h + 1) * head_dim, :].T, f"q_proj {i} {h}")
        k_rows, v_rows = n_heads * head_dim, (n_heads + n_kv) * head_dim
        for h in range(n_kv):
            same(layers["k_proj"][i][:, h, :], qkv[k_rows + h * head_dim:k_rows + (h + 1) * head_dim, :].T,
                 f"k_proj {i} {h}")
            same(layers["v_proj"][i][:, h, :], qkv[v_rows + h * head_dim:v_rows + (h + 1) * head_dim, :].T,
                 f"v_proj {i} {h}")
        o = hf[p + "self_attn.o_proj.weight"]                     # [hidden, heads * head_dim]
        for h in range(n_heads):
            same(layers["o_proj"][i][h], o[:, h * head_dim:(h + 1) * head_dim].T, f"o_proj {i} {h}")
        gate_up = hf[p + "mlp.gate_up_proj.weight"]               # [2 * ffn, hidden]
        same(layers["gate_proj"][i], gate_up[:ffn].T, f"gate_proj {i}")
        same(layers["up_proj"][i], gate_up[ffn:].T, f"up_proj {i}")
        same(layers["down_proj"][i], hf[p + "mlp.down_proj.weight"].T, f"down_proj {i}")
        same(layers["attn_norm"][i], hf[p + "input_layernorm.weight"], f"attn_norm {i}")
        same(layers["mlp_norm"][i], hf[p + "post_attention_layernorm.weight"], f"mlp_norm {i}")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def fp32_hf(work):
    """A sharded-safetensors fp32 tiny model (transformers-5 config with rope_parameters)."""
    return make_tiny_phi3_dir(work / "hf_fp32", fmt="safetensors-sharded", layers=2, seed=1)


@pytest.fixture(scope="module")
def fp32_ours(work, fp32_hf):
    run_cli(fp32_hf[0], work / "ours_fp32")
    return work / "ours_fp32"


@pytest.fixture(scope="module")
def bf16_hf(work):
    """A single-file bf16 model with a phi-4 style config (top-level rope_theta)."""
    return make_tiny_phi3_dir(work / "hf_bf16", fmt="safetensors", dtype="bfloat16", phi4_style_config=True,
                              hidden=64, heads=8, kv_heads=2, intermediate=96, vocab=257, seed=2)


# ----------------------------------------------------------------------------- every format

@pytest.fixture(scope="module")
def format_input_ids():
    return np.random.default_rng(5).integers(0, 131, size=(1, 512), dtype=np.int64)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_converts_to_hf_slices_and_matches_transformers_logits(work, fmt, format_input_ids):
    """Each source format (sharded safetensors + index, single safetensors, pytorch_model.bin, sharded .bin +
    index, model.pt) -> converter -> parameters equal to hand-indexed slices of the HF tensors, and
    `load_model` logits equal transformers' on 512 tokens (fp32, 1e-4 of max |logit|). GQA 2, so the k and v
    heads have their own row blocks. Taking the v rows of qkv_proj from where the k rows are (or the up half of
    gate_up_proj as gate) fails this test."""
    from phi4_jax import load_model
    from phi4_jax.checkpoint.store import read_checkpoint_config

    src, model = make_tiny_phi3_dir(work / f"fmt_{fmt}", fmt=fmt, phi4_style_config=fmt.startswith("bin"),
                                    hidden=48, heads=4, kv_heads=2, layers=2, intermediate=80, vocab=131,
                                    seed=3)
    dst = work / f"fmt_{fmt}_ours"
    if fmt in ("bin-sharded", "pt"):  # the real CLI in a subprocess (in-process for the others: cheaper)
        run_cli(src, dst)
    else:
        assert cli_main(src, dst) == 0
    config, meta = read_checkpoint_config(dst)
    assert meta["param_dtype"] == "float32" and config.num_kv_heads == 2 and config.num_heads == 4
    assert config.rope_theta == (250000.0 if fmt.startswith("bin") else 10000.0)
    assert_params_are_hf_slices(restored_params(dst), model_state(model))

    ref = hf_logits(model, format_input_ids)
    assert np.std(ref) > 0.5, "reference logits are too flat to be a meaningful check"
    ours = np.asarray(load_model(dst)(format_input_ids))
    err = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    assert err <= 1e-4, f"{fmt}: max|ours - transformers| / max|transformers| = {err:.2e}"


def test_checkpoint_layout_and_plain_orbax_restore(fp32_ours, fp32_hf):
    import orbax.checkpoint as ocp

    hf_cfg = json.loads((fp32_ours / "config.json").read_text())
    assert hf_cfg["architectures"] == ["Phi3ForCausalLM"]
    assert hf_cfg["phi4_jax"]["param_dtype"] == "float32"
    # Orbax on its own (no phi4_jax code) restores the tree: it is a real Orbax checkpoint.
    restored = ocp.StandardCheckpointer().restore(fp32_ours / "params")
    assert_params_are_hf_slices(restored, model_state(fp32_hf[1]))
    assert restored["layers"]["q_proj"].shape == (2, 72, 6, 12)


def test_restore_onto_a_mesh(fp32_ours, fp32_hf):
    """load_model(sharding=callable) places each parameter on the sharding its logical axes ask for."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from phi4_jax import load_model

    devices = np.array(jax.devices()[:2])
    if devices.size < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count (tests/conftest.py)")
    mesh = Mesh(devices, ("fsdp",))
    seen = {}

    def sharding(path, shape, axes):
        seen[path] = axes
        spec = PartitionSpec(*["fsdp" if a == "embed" and shape[i] % 2 == 0 else None for i, a in enumerate(axes)])
        return NamedSharding(mesh, spec)

    model = load_model(fp32_ours, sharding=sharding)
    assert seen[("layers", "q_proj")] == ("layers", "embed", "q_heads", "head_dim")
    q = model.layers["q_proj"][...]
    assert q.sharding == NamedSharding(mesh, PartitionSpec(None, "fsdp", None, None))
    assert_params_are_hf_slices(jax.device_get(model.params), model_state(fp32_hf[1]))


# ----------------------------------------------------------------------------- round trips

def _assert_hf_dirs_equal(original: dict, back_dir):
    back = hf_tensors(back_dir)
    assert back.keys() == original.keys()
    for name, value in original.items():
        assert back[name].dtype == value.dtype, name
        assert np.array_equal(back[name], value), name


def test_round_trip_fp32_sharded_is_bit_exact_and_loads_in_transformers(work, fp32_hf, fp32_ours):
    from transformers import AutoModelForCausalLM

    back = work / "back_fp32"
    run_cli("--to-hf", fp32_ours, back, "--max-shard-size", "150KB")
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.getsize(back / s) <= 150_000 + 64 * 1024 for s in shards)
    _assert_hf_dirs_equal(model_state(fp32_hf[1]), back)

    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    ids = np.random.default_rng(0).integers(0, 311, (2, 64))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(fp32_hf[1], ids))


def test_multi_chunk_streaming_round_trip(work, fp32_hf, monkeypatch):
    """With tiny chunks, every array spans many chunks and embed / lm_head stream in many row blocks
    (the path a real 1 GB embedding takes); the result is still exact both ways."""
    from phi4_jax.checkpoint import hf_convert
    from phi4_jax.checkpoint import store as checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK_TARGET_BYTES", 4096)
    hf_convert.hf_to_checkpoint(fp32_hf[0], work / "ours_chunked", progress=False)
    zarray = json.loads((work / "ours_chunked" / "params" / "lm_head" / ".zarray").read_text())
    assert zarray["shape"] == [72, 311] and zarray["chunks"][0] == 72 and zarray["chunks"][1] < 311
    assert json.loads((work / "ours_chunked" / "params" / "embed" / ".zarray").read_text())["chunks"][0] < 311
    assert_params_are_hf_slices(restored_params(work / "ours_chunked"), model_state(fp32_hf[1]))
    hf_convert.checkpoint_to_hf(work / "ours_chunked", work / "back_chunked", progress=False)
    _assert_hf_dirs_equal(model_state(fp32_hf[1]), work / "back_chunked")


def test_round_trip_bf16_is_bit_exact(work, bf16_hf):
    src, model = bf16_hf
    assert cli_main(src, work / "ours_bf16") == 0  # in-process: the CLI subprocess runs in other tests
    meta = json.loads((work / "ours_bf16" / "config.json").read_text())["phi4_jax"]
    assert meta["param_dtype"] == "bfloat16" and meta["source_dtype"] == "bfloat16"
    assert json.loads((work / "ours_bf16" / "config.json").read_text())["rope_theta"] == 250000.0
    assert cli_main("--to-hf", work / "ours_bf16", work / "back_bf16") == 0
    assert (work / "back_bf16" / "model.safetensors").exists()  # small: one shard, no index
    original = model_state(model)
    assert original["lm_head.weight"].dtype == ml_dtypes.bfloat16
    _assert_hf_dirs_equal(original, work / "back_bf16")

    import torch
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(work / "back_bf16")
    assert reloaded.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- --dtype

def test_dtype_option_casts_both_directions(work, fp32_hf, fp32_ours, bf16_hf):
    from phi4_jax.checkpoint.store import read_checkpoint_config

    # fp32 source -> bf16 checkpoint: values are the round-to-nearest-even casts of the source.
    assert cli_main(fp32_hf[0], work / "ours_fp32_as_bf16", "--dtype", "bfloat16") == 0
    _, meta = read_checkpoint_config(work / "ours_fp32_as_bf16")
    assert meta["param_dtype"] == "bfloat16" and meta["source_dtype"] == "float32"
    assert_params_are_hf_slices(restored_params(work / "ours_fp32_as_bf16"), model_state(fp32_hf[1]),
                                dtype=ml_dtypes.bfloat16)

    # bf16 source -> fp32 checkpoint is an exact upcast.
    assert cli_main(bf16_hf[0], work / "ours_bf16_as_fp32", "--dtype", "float32") == 0
    assert_params_are_hf_slices(restored_params(work / "ours_bf16_as_fp32"), model_state(bf16_hf[1]),
                                dtype=np.float32)

    # --to-hf --dtype float16
    assert cli_main("--to-hf", fp32_ours, work / "back_fp16", "--dtype", "float16") == 0
    back = hf_tensors(work / "back_fp16")
    for name, value in model_state(fp32_hf[1]).items():
        assert back[name].dtype == np.float16 and np.array_equal(back[name], value.astype(np.float16)), name
    assert json.loads((work / "back_fp16" / "config.json").read_text())["dtype"] == "float16"


def test_load_model_dtype_and_compute_dtype(fp32_ours):
    import jax.numpy as jnp

    from phi4_jax import load_model

    model = load_model(fp32_ours, dtype=jnp.bfloat16)
    assert model.config.param_dtype == "bfloat16" and model.config.compute_dtype == "bfloat16"
    assert model.layers["q_proj"][...].dtype == jnp.bfloat16
    model = load_model(fp32_ours, remat_policy="none")
    assert model.config.param_dtype == "float32" and model.config.compute_dtype == "float32"
    assert model.config.remat_policy == "none"


# ----------------------------------------------------------------------------- bad inputs

def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _rewrite_single_file(src_dir, dst_dir, edit):
    """Copies a single-file safetensors fp32 model, applying edit(dict of numpy tensors) -> dict."""
    from safetensors.numpy import load_file, save_file
    dst = _copy(src_dir, dst_dir)
    tensors = edit(load_file(dst / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def single_fp32(work):
    return make_tiny_phi3_dir(work / "single_fp32", fmt="safetensors", hidden=48, heads=4, kv_heads=2,
                              intermediate=80, vocab=131, layers=2, seed=4)[0]


def expect_cli_error(capsys, work, src, dst_name, *messages, extra=()):
    """convert_weights.py on `src` (a path, or a list of arguments before the destination) fails with one
    `error: ...` line holding every message, and leaves nothing behind."""
    args = list(src) if isinstance(src, (list, tuple)) else [src]
    code = cli_main(*args, work / dst_name, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for m in messages:
        assert m in err, (m, err)
    assert no_leftovers(work, dst_name), list(work.glob(f"*{dst_name}*"))
    return err


def test_error_missing_tensor(work, capsys, single_fp32):
    src = _rewrite_single_file(single_fp32, work / "bad_missing",
                               lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.down_proj.weight"})
    expect_cli_error(capsys, work, src, "out_missing", "missing tensor 'model.layers.1.mlp.down_proj.weight'")


def test_error_extra_tensor(work, capsys, single_fp32):
    src = _rewrite_single_file(single_fp32, work / "bad_extra",
                               lambda t: {**t, "model.layers.2.mlp.down_proj.weight": t["model.norm.weight"]})
    expect_cli_error(capsys, work, src, "out_extra", "unexpected tensor 'model.layers.2.mlp.down_proj.weight'",
                  "model.safetensors")


def test_error_misshapen_tensor(work, capsys, single_fp32):
    src = _rewrite_single_file(single_fp32, work / "bad_shape", lambda t: {
        **t, "model.layers.0.self_attn.o_proj.weight": t["model.layers.0.self_attn.o_proj.weight"][:, :-1].copy()})
    expect_cli_error(capsys, work, src, "out_shape", "tensor 'model.layers.0.self_attn.o_proj.weight'",
                  "shape [48, 47], expected [48, 48]")


def test_error_unsupported_dtype(work, capsys, single_fp32):
    src = _rewrite_single_file(single_fp32, work / "bad_int8", lambda t: {
        **t, "lm_head.weight": (t["lm_head.weight"] * 100).astype(np.int8)})
    expect_cli_error(capsys, work, src, "out_int8", "tensor 'lm_head.weight'", "dtype I8", "cannot be converted")


def test_error_truncated_shard(work, capsys, fp32_hf):
    src = _copy(fp32_hf[0], work / "bad_trunc")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    expect_cli_error(capsys, work, src, "out_trunc", f"{shard.name} is truncated")


def test_error_corrupt_index_and_missing_shard(work, capsys, fp32_hf):
    src = _copy(fp32_hf[0], work / "bad_index")
    (src / "model.safetensors.index.json").write_text('{"weight_map": {"x": ')
    expect_cli_error(capsys, work, src, "out_index", "corrupt index model.safetensors.index.json")

    src = _copy(fp32_hf[0], work / "bad_index2")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.unlink()
    expect_cli_error(capsys, work, src, "out_index2", f"lists shard '{shard.name}', which is missing")


def test_error_corrupt_safetensors_header(work, capsys, single_fp32):
    src = _copy(single_fp32, work / "bad_header")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[10:20] = b"\xff" * 10
    (src / "model.safetensors").write_bytes(bytes(data))
    expect_cli_error(capsys, work, src, "out_header", "model.safetensors: corrupt safetensors header")


def test_error_corrupt_torch_file(work, capsys):
    src, _ = make_tiny_phi3_dir(work / "bad_bin", fmt="bin", hidden=32, heads=2, kv_heads=2, intermediate=48,
                                vocab=64, layers=1, seed=5)
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    expect_cli_error(capsys, work, src, "out_bin", "cannot read PyTorch file pytorch_model.bin")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "longrope"),
    ({"sliding_window": 2047}, "sliding_window=2047 is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5 is not supported"),
])
def test_error_wrong_architecture(work, capsys, single_fp32, change, message):
    name = "bad_arch_" + next(iter(change))
    src = _copy(single_fp32, work / name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    expect_cli_error(capsys, work, src, "out_" + name, "config.json: ", message)


def test_error_missing_config_and_missing_source(work, capsys, single_fp32):
    src = _copy(single_fp32, work / "bad_noconfig")
    (src / "config.json").unlink()
    expect_cli_error(capsys, work, src, "out_noconfig", "no config.json in")
    expect_cli_error(capsys, work, work / "does_not_exist", "out_nosrc", "is not a directory")
    empty = work / "bad_noweights"
    empty.mkdir()
    shutil.copy(single_fp32 / "config.json", empty / "config.json")
    expect_cli_error(capsys, work, empty, "out_noweights", "no weights in")


def test_refuses_non_empty_destination_unless_overwrite(work, capsys, single_fp32):
    dst = work / "existing"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert cli_main(single_fp32, dst) == 1
    assert "is not empty (pass --overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").exists()
    assert cli_main(single_fp32, dst, "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and (dst / "params" / "_METADATA").exists()
    assert not list(work.glob(".existing.*"))
    empty = work / "existing_empty"
    empty.mkdir()
    assert cli_main(single_fp32, empty) == 0  # an empty directory is fine
    # The source itself (or a directory inside it) is never a valid output, even with --overwrite.
    assert cli_main(single_fp32, single_fp32, "--overwrite") == 1
    assert "must be outside the source directory" in capsys.readouterr().err
    assert cli_main("--to-hf", dst, dst / "hf") == 1
    assert "must be outside the source directory" in capsys.readouterr().err
    assert (single_fp32 / "model.safetensors").exists() and (dst / "params").exists()


def test_failure_midway_leaves_nothing(work, single_fp32, monkeypatch):
    """An error after some tensors were written leaves neither the destination nor a temp dir."""
    from phi4_jax.checkpoint import hf_convert, hf_files

    calls = []
    real = hf_convert._convert_tensor

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise hf_files.ConversionError("simulated failure while writing")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_convert, "_convert_tensor", flaky)
    with pytest.raises(hf_files.ConversionError, match="simulated"):
        hf_convert.hf_to_checkpoint(single_fp32, work / "out_midway", progress=False)
    assert len(calls) == 3 and no_leftovers(work, "out_midway")


def test_cli_subprocess_error_is_one_line(work, single_fp32):
    proc = run_cli(work / "nowhere", work / "out_cli_err", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: source {str(work / 'nowhere')!r} is not a directory"]


def test_load_model_errors(work, fp32_ours):
    from phi4_jax import load_model
    from phi4_jax.checkpoint.store import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(work / "no_such_checkpoint")
    d = work / "ckpt_noconfig"
    d.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(d)
    with pytest.raises(CheckpointError, match="not written by phi4_jax"):
        load_model(work / "single_fp32")  # a HF dir, not a converted one

    broken = _copy(fp32_ours, work / "ckpt_noparams")
    shutil.rmtree(broken / "params")
    with pytest.raises(CheckpointError, match="has no parameters"):
        load_model(broken)

    broken = _copy(fp32_ours, work / "ckpt_nochunk")
    (broken / "params" / "layers.up_proj" / "1.0.0").unlink()
    with pytest.raises(CheckpointError, match="data file layers.up_proj/1.0.0 is missing"):
        load_model(broken)

    broken = _copy(fp32_ours, work / "ckpt_badchunk")
    (broken / "params" / "layers.up_proj" / "0.0.0").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or incomplete checkpoint"):
        load_model(broken)

    broken = _copy(fp32_ours, work / "ckpt_badshape")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'layers/down_proj'.*has shape"):
        load_model(broken)

    with pytest.raises(CheckpointError, match="unsupported parameter dtype 'int8'"):
        load_model(fp32_ours, dtype="int8")
