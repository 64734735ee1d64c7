"""GGUF in and out (`convert_weights.py SRC.gguf DST`, `--to-gguf`), against llama.cpp's `gguf` package and
transformers.

The GGUF files are written here with `gguf.GGUFWriter` from a tiny random transformers Phi3ForCausalLM, with
llama.cpp's phi3 tensor names and metadata keys spelled out in this file (`LLAMA_CPP_NAMES`, `write_gguf`), not
taken from the converter. Peers: transformers' logits (of the original model, and of the same model with the
weights the GGUF file actually holds, decoded by `gguf.quants.dequantize`), and `gguf.GGUFReader` /
`gguf.quants.quantize` for what `--to-gguf` writes. Sizes: rows of 64 and 96 values, so Q8_0 and Q4_0 blocks
(32 values) fit; the K-quants (256-value super-blocks), which the gguf package decodes but cannot encode, are
random blocks with small scales in a model with rows of 256.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_models import hf_logits, make_tiny_phi3_model
from test_convert import cli_main, expect_cli_error, model_state, restored_params

gguf = pytest.importorskip("gguf")

SIZES = {"hidden": 64, "heads": 4, "kv_heads": 2, "layers": 2, "intermediate": 96, "vocab": 131}


def LLAMA_CPP_NAMES(layers: int) -> dict[str, str]:
    """HF tensor name -> llama.cpp phi3 GGUF tensor name (as llama.cpp's convert_hf_to_gguf.py maps them)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names.update({p + "input_layernorm.weight": b + "attn_norm.weight",
                      p + "self_attn.qkv_proj.weight": b + "attn_qkv.weight",
                      p + "self_attn.o_proj.weight": b + "attn_output.weight",
                      p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
                      p + "mlp.gate_up_proj.weight": b + "ffn_up.weight",
                      p + "mlp.down_proj.weight": b + "ffn_down.weight"})
    return names


def write_gguf(path, model, qtype="F32", *, arch="phi3", override=None, drop=None, encode=None):
    """A phi3 GGUF of the HF `model`: 2-D weights in `qtype`, norms in F32. `override` {gguf name: (array,
    raw GGML type)} replaces tensors; `drop` leaves one out; `encode(tensor, qtype)` replaces
    gguf.quants.quantize for 2-D weights. Returns {HF name: the float32 weights the file
    holds}."""
    c = model.config
    t = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    held = {}
    for hf_name, tensor in model_state(model).items():
        name = LLAMA_CPP_NAMES(c.num_hidden_layers)[hf_name]
        if name == drop:
            continue
        q = gguf.GGMLQuantizationType.F32 if tensor.ndim == 1 else t
        data = (encode or gguf.quants.quantize)(tensor.astype(np.float32), q) if tensor.ndim > 1 else \
            gguf.quants.quantize(tensor.astype(np.float32), q)
        if override and name in override:
            data, q = override[name][0], gguf.GGMLQuantizationType[override[name][1]]
        w.add_tensor(name, data, raw_dtype=q)
        if not (override or drop):
            held[hf_name] = gguf.quants.dequantize(data, q).reshape(tensor.shape).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def hf_model():
    return make_tiny_phi3_model(seed=11, **SIZES)


@pytest.fixture(scope="module")
def input_ids():
    return np.random.default_rng(7).integers(0, SIZES["vocab"], size=(1, 512), dtype=np.int64)


@pytest.fixture(scope="module")
def hf_ref(hf_model, input_ids):
    ref = hf_logits(hf_model, input_ids)
    assert np.std(ref) > 0.5, "reference logits are too flat to be a meaningful check"
    return ref


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _hf_with_weights(hf_model, weights: dict[str, np.ndarray]):
    """A copy of the transformers model holding `weights` (what a GGUF file decodes to)."""
    import copy

    import torch
    model = copy.deepcopy(hf_model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model


# Bound on the relative RMS error ||ours - transformers(original weights)|| / ||transformers|| per file type.
# Each type rounds a weight by a known RMS amount: F32 none; F16 ~2^-11/sqrt(12) of |w|; BF16 ~2^-8/sqrt(12);
# Q8_0 (int8 times block max/127 per 32 values) ~(max/127)/sqrt(12), about 0.5% of the weights' std; Q4_0
# (4-bit steps of max/8) ~8% of their std. This tiny random model (large init, 2 layers, 512 tokens) amplifies
# weight noise into the logits by about 10x (measured: F16 1.2e-3, BF16 8.9e-3, Q8_0 3.1e-2, Q4_0 0.45), so each
# bound is about twice the measured error: it fails if a format decodes worse than its own rounding allows (the
# exact check against the file's own weights is the 1e-4 one).
FORMAT_BOUNDS = {"F32": 1e-5, "F16": 3e-3, "BF16": 2e-2, "Q8_0": 6e-2, "Q4_0": 0.8}


@pytest.mark.parametrize("qtype", list(FORMAT_BOUNDS))
def test_gguf_to_ours_matches_transformers(work, hf_model, input_ids, hf_ref, qtype):
    """phi3 GGUF (each type) -> convert_weights.py -> load_model: logits equal transformers' run on the weights
    the file holds (decoded by gguf.quants.dequantize) to 1e-4 of max |logit|, and transformers' on the original
    weights within the format's error (FORMAT_BOUNDS). Swapping gate and up halves of ffn_up, k and v rows of attn_qkv, or the
    norms, or reading a dimension order reversed, fails the first check; a wrong dequantization the second."""
    from phi4_jax import load_model
    from phi4_jax.checkpoint.store import read_checkpoint_config

    src = work / f"tiny-{qtype}.gguf"
    held = write_gguf(src, hf_model, qtype)
    dst = work / f"ours-{qtype}"
    assert cli_main(src, dst) == 0
    config, meta = read_checkpoint_config(dst)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
            config.num_heads, config.num_kv_heads) == (131, 64, 96, 2, 4, 2)
    assert config.rope_theta == hf_model.config.rope_parameters["rope_theta"] and meta["param_dtype"] == "float32"
    ours = np.asarray(load_model(dst)(input_ids))
    exact = hf_logits(_hf_with_weights(hf_model, held), input_ids)
    assert _rel_err(ours, exact) <= 1e-4, f"{qtype}: vs transformers on the file's weights {_rel_err(ours, exact)}"
    err = float(np.linalg.norm(ours - hf_ref) / np.linalg.norm(hf_ref))
    assert err <= FORMAT_BOUNDS[qtype], f"{qtype}: relative RMS error vs transformers on the original weights {err:.2e}"
    if qtype != "F32":
        assert err > 1e-6, f"{qtype}: no rounding at all, so the file cannot hold {qtype} weights"


# Where each K-quant block keeps its float16 super-block scales (llama.cpp's block_q4_K, block_q5_K: d and dmin
# first; block_q6_K: d last), and a range for them that keeps the decoded weights below about 1 (Q4_K/Q5_K: d
# times 6-bit scale times 4/5-bit quant; Q6_K: d times int8 scale times 6-bit quant).
K_QUANT_SCALES = {"Q4_K": (slice(0, 4), 1e-3), "Q5_K": (slice(0, 4), 5e-4), "Q6_K": (slice(-2, None), 5e-5)}


@pytest.mark.parametrize("qtype", list(K_QUANT_SCALES))
def test_k_quant_gguf_matches_transformers_on_its_weights(work, qtype):
    """Q4_K, Q5_K, Q6_K (what phi-4's Q4_K_M files hold; the gguf package decodes but cannot encode them):
    random blocks with small scales, decoded by gguf.quants.dequantize, are the weights transformers runs; our
    converted model's logits equal its to 1e-4 of max |logit| (rows of 256 values: one super-block)."""
    from phi4_jax import load_model

    model = make_tiny_phi3_model(seed=5, hidden=256, heads=4, kv_heads=2, layers=1, intermediate=256, vocab=131)
    rng = np.random.default_rng(3)
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]

    def random_blocks(tensor, q):
        raw = rng.integers(0, 256, size=(tensor.shape[0], tensor.shape[1] // block, size), dtype=np.uint8)
        where, top = K_QUANT_SCALES[qtype]
        n = len(range(size)[where]) // 2
        raw[..., where] = rng.uniform(top / 5, top, size=(*raw.shape[:2], n)).astype(np.float16).view(np.uint8)
        return raw.reshape(tensor.shape[0], -1)

    src = work / f"tiny-{qtype}.gguf"
    held = write_gguf(src, model, qtype, encode=random_blocks)
    dst = work / f"ours-{qtype}"
    assert cli_main(src, dst) == 0
    ids = np.random.default_rng(8).integers(0, 131, size=(1, 512), dtype=np.int64)
    exact = hf_logits(_hf_with_weights(model, held), ids)
    assert np.all(np.isfinite(exact)) and np.std(exact) > 0.05, "reference logits are not a meaningful check"
    ours = np.asarray(load_model(dst)(ids))
    assert _rel_err(ours, exact) <= 1e-4, f"{qtype}: {_rel_err(ours, exact):.2e}"


def test_gguf_with_separate_q_k_v(work, hf_model, input_ids, hf_ref):
    """A GGUF with attn_q, attn_k, attn_v instead of attn_qkv converts to the same model (F32, 1e-4)."""
    from phi4_jax import load_model

    c = hf_model.config
    q, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    state = model_state(hf_model)
    path = work / "split-qkv.gguf"
    w = gguf.GGUFWriter(path, "phi3")
    for key, value in (("context_length", c.max_position_embeddings), ("embedding_length", c.hidden_size),
                       ("feed_forward_length", c.intermediate_size), ("block_count", c.num_hidden_layers),
                       ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads)):
        w.add_uint32(f"phi3.{key}", value)
    w.add_float32("phi3.rope.freq_base", c.rope_parameters["rope_theta"])
    w.add_float32("phi3.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    for hf_name, tensor in state.items():
        name = LLAMA_CPP_NAMES(c.num_hidden_layers)[hf_name]
        if name.endswith("attn_qkv.weight"):
            blk = name.removesuffix("attn_qkv.weight")
            for part, rows in (("attn_q", slice(0, q)), ("attn_k", slice(q, q + kv)), ("attn_v", slice(q + kv, None))):
                w.add_tensor(f"{blk}{part}.weight", np.ascontiguousarray(tensor[rows]))
        else:
            w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dst = work / "ours-split"
    assert cli_main(path, dst) == 0
    assert _rel_err(np.asarray(load_model(dst)(input_ids)), hf_ref) <= 1e-4


@pytest.fixture(scope="module")
def ours_f32(work, hf_model):
    """Our checkpoint of hf_model, through the (already tested) HF converter."""
    from hf_models import save_phi3_dir
    src = work / "hf-dir"
    save_phi3_dir(hf_model, src, fmt="safetensors")
    dst = work / "ours-from-hf"
    assert cli_main(src, dst) == 0
    return dst


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_ours_to_gguf_tensors_and_metadata(work, hf_model, ours_f32, gguf_type):
    """--to-gguf: gguf.GGUFReader reads every llama.cpp phi3 tensor name with its HF tensor's data encoded as
    gguf.quants.quantize encodes it (so f32 is exact; 1-D norms stay F32), dims in GGUF order, and the phi3
    hyper-parameter keys equal the transformers config; --no-tokenizer marks the file weights-only (llama.cpp's
    "none" tokenizer); with q4_0 the output layer is q8_0, as llama.cpp's quantizer keeps it. A transposed,
    misnamed or mis-encoded tensor, a q4_0 output layer, or a wrong/missing key, fails."""
    out = work / f"out-{gguf_type}.gguf"
    assert cli_main("--to-gguf", ours_f32, out, "--type", gguf_type, "--no-tokenizer") == 0
    reader = gguf.GGUFReader(out)
    c = hf_model.config
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "phi3"
    expect = {"phi3.block_count": c.num_hidden_layers, "phi3.embedding_length": c.hidden_size,
              "phi3.feed_forward_length": c.intermediate_size, "phi3.attention.head_count": c.num_attention_heads,
              "phi3.attention.head_count_kv": c.num_key_value_heads, "phi3.context_length": c.max_position_embeddings,
              "phi3.rope.dimension_count": c.hidden_size // c.num_attention_heads,
              "phi3.rope.freq_base": c.rope_parameters["rope_theta"], "phi3.vocab_size": c.vocab_size,
              "tokenizer.ggml.bos_token_id": c.bos_token_id, "tokenizer.ggml.eos_token_id": c.eos_token_id}
    for key, value in expect.items():
        assert fields[key] == pytest.approx(value), key
    assert fields["tokenizer.ggml.model"] == "none" and "tokenizer.ggml.tokens" not in fields
    assert fields["phi3.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps, rel=1e-6)
    tensors = {t.name: t for t in reader.tensors}
    names = LLAMA_CPP_NAMES(c.num_hidden_layers)
    assert sorted(tensors) == sorted(names.values())
    for hf_name, want in model_state(hf_model).items():
        t = tensors[names[hf_name]]
        assert list(t.shape) == list(reversed(want.shape)), hf_name  # GGUF lists the innermost dim first
        qtype = gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType[gguf_type.upper()]
        if hf_name == "lm_head.weight" and gguf_type == "q4_0":  # llama.cpp keeps the output layer above 4 bits
            qtype = gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == qtype, hf_name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                                      gguf.quants.quantize(want, qtype).reshape(-1).view(np.uint8), err_msg=hf_name)


def test_round_trip_ours_gguf_ours_is_exact_f32(work, ours_f32):
    """ours -> GGUF f32 -> ours: every parameter bit-identical."""
    out = work / "rt.gguf"
    assert cli_main("--to-gguf", ours_f32, out, "--type", "f32", "--no-tokenizer") == 0
    back = work / "rt-ours"
    assert cli_main(out, back) == 0
    a, b = restored_params(ours_f32), restored_params(back)
    import jax
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), dict(jax.tree_util.tree_leaves_with_path(b))
    assert {p for p, _ in flat_a} == set(flat_b) and len(flat_b) == 12  # embed, lm_head, norm, 9 per-layer
    for path, value in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(value), err_msg=str(path))


def test_names_and_cli_types_agree_with_llama_cpp():
    """Our name table uses only llama.cpp's phi3 tensor names, and the CLI offers exactly the writer's types."""
    from phi4_jax.checkpoint import gguf_convert
    from phi4_jax.cli import convert

    theirs = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI3]}
    ours = set(gguf_convert.GGUF_TO_HF_PATTERNS) | {f"blk.{{bid}}.{n}" for n in gguf_convert.SPLIT_QKV}
    assert ours <= theirs, sorted(ours - theirs)
    assert set(convert.GGUF_TYPES) == set(gguf_convert.GGUF_TYPES)


def test_error_other_architecture(work, hf_model, capsys):
    src = work / "llama.gguf"
    write_gguf(src, hf_model, arch="llama")
    expect_cli_error(capsys, work, [src], "out-arch", "llama.gguf", "architecture is 'llama'", "'phi3'")


def test_error_unsupported_quant_type(work, hf_model, capsys):
    """A tensor in a type gguf.quants cannot decode (Q8_1: 32 values per 40-byte block) is named with its type."""
    src = work / "q8_1.gguf"
    rows, cols = SIZES["hidden"], SIZES["intermediate"]  # ffn_down is [hidden, intermediate]
    raw = np.random.default_rng(0).integers(0, 255, size=(rows, cols // 32 * 40), dtype=np.uint8)
    write_gguf(src, hf_model, override={"blk.0.ffn_down.weight": (raw, "Q8_1")})
    expect_cli_error(capsys, work, [src], "out-q81", "q8_1.gguf", "'blk.0.ffn_down.weight'", "Q8_1")


def test_error_truncated_file(work, hf_model, capsys):
    src = work / "cut.gguf"
    write_gguf(src, hf_model)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 5000])  # cut inside the tensor data
    expect_cli_error(capsys, work, [src], "out-cut", "cut.gguf", "truncated or corrupt GGUF")
    src.write_bytes(data[:300])  # cut inside the metadata
    expect_cli_error(capsys, work, [src], "out-cut", "cut.gguf", "truncated or corrupt GGUF")


def test_error_q8_0_rows_not_whole_blocks(work, capsys):
    """--type q8_0 on a model whose rows are not whole 32-value blocks names the tensor; no file is left."""
    from hf_models import make_tiny_phi3_dir
    src, _ = make_tiny_phi3_dir(work / "odd-hf", fmt="safetensors", hidden=48, heads=4, kv_heads=2, layers=1,
                                intermediate=80, vocab=37, seed=2)
    ours = work / "odd-ours"
    assert cli_main(src, ours) == 0
    capsys.readouterr()  # transformers' save progress
    expect_cli_error(capsys, work, ["--to-gguf", "--type", "q8_0", "--no-tokenizer", ours], "odd.gguf", "q8_0",
                     "multiple of 32")


def test_error_missing_and_misshapen_tensors(work, hf_model, capsys):
    """A GGUF without blk.1.ffn_down, or with ffn_up of the wrong size, is named with llama.cpp's tensor name."""
    src = work / "short.gguf"
    write_gguf(src, hf_model, drop="blk.1.ffn_down.weight")
    expect_cli_error(capsys, work, [src], "out-short", "short.gguf", "missing tensor 'blk.1.ffn_down.weight'")
    src = work / "wide.gguf"
    bad = np.zeros((2 * SIZES["intermediate"] + 32, SIZES["hidden"]), np.float32)
    write_gguf(src, hf_model, override={"blk.0.ffn_up.weight": (bad, "F32")})
    expect_cli_error(capsys, work, [src], "out-wide", "'blk.0.ffn_up.weight'", "dims [64, 224]", "expected [64, 192]")
