"""GGUF out (`convert_weights.py --to-gguf`): round trips per weight type, phi-4's tokenizer and chat template in
the metadata, the embedded-tokenizer check on the way in, and llama.cpp itself when `llama_cpp` is importable.

Peers: NumPy's float16 and ml_dtypes' bfloat16 casts (f16/bf16 round trips are exact against them), the Q8_0 and
Q4_0 block definitions (ggml's `block_q8_0` / `block_q4_0`: error bounds derived below), tiktoken (the phi-4
token ids that HF `tokenizers`' BPE, built from the file's tokens and merges, must reproduce), jinja2 (renders the
file's chat template), and llama.cpp (`llama-cpp-python`: tokenization and greedy tokens).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hf_models import make_tiny_phi3_model, save_phi3_dir
from test_convert import cli_main, expect_cli_error, hf_tensors, model_state

gguf = pytest.importorskip("gguf")

SMALL = {"hidden": 64, "heads": 4, "kv_heads": 2, "layers": 2, "intermediate": 96, "vocab": 131}
# phi-4's vocabulary on an otherwise tiny model (one layer, rows of 64 and 96 values: whole Q4_0/Q8_0 blocks).
PHI4_VOCAB = {"hidden": 64, "heads": 4, "kv_heads": 2, "layers": 1, "intermediate": 96, "vocab": 100352}
PHI4_IDS = {"bos_token_id": 100257, "eos_token_id": 100265, "pad_token_id": 100349}  # PHI4.md
TEXTS = [
    "Hello World! I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? "
    "We'Ve a'lL",
    "3 33 333 3333 33333 333333 3333333 3.3 3..3 3...3 0x1F 1,000,000.25 2024-12-12",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "def f(x):\n    return x ** 2  # squares\n\n\nclass A:\n\tpass\n",
    "нещо на Български 我想在apple工作1314151天～ កាន់តែពិសេសអាច ------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 naïve café Ünïcödé ß ΣΛΩ",
    "   leading spaces and trailing ones   ",
]

# cl100k_base's split regex as Hugging Face tokenizer.json files of cl100k tokenizers spell it (Oniguruma reads
# tiktoken's possessive `{1,3}+` as "one or more groups of 1-3", so it is written without).
HF_CL100K_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                   r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _cli_ok(*args):
    assert cli_main(*args) == 0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-out")


@pytest.fixture(scope="module")
def small_model():
    return make_tiny_phi3_model(seed=21, **SMALL)


@pytest.fixture(scope="module")
def small_ours(work, small_model):
    """Our float32 checkpoint of the small model (through the tested HF converter)."""
    save_phi3_dir(small_model, work / "small-hf", fmt="safetensors")
    _cli_ok(work / "small-hf", work / "small-ours")
    return work / "small-ours"


@pytest.fixture(scope="module")
def phi4_vocab_model():
    model = make_tiny_phi3_model(seed=22, **PHI4_VOCAB)
    for key, value in PHI4_IDS.items():
        setattr(model.config, key, value)
    return model


@pytest.fixture(scope="module")
def phi4_vocab_ours(work, phi4_vocab_model):
    save_phi3_dir(phi4_vocab_model, work / "phi4v-hf", fmt="safetensors")
    _cli_ok(work / "phi4v-hf", work / "phi4v-ours")
    return work / "phi4v-ours"


@pytest.fixture(scope="module")
def phi4_gguf(work, phi4_vocab_ours):
    """--to-gguf (f16, with phi-4's tokenizer) of the phi-4-vocabulary model."""
    out = work / "phi4v-f16.gguf"
    _cli_ok("--to-gguf", phi4_vocab_ours, out, "--type", "f16")
    return out


@pytest.fixture(scope="module")
def phi4_fields(phi4_gguf):
    reader = gguf.GGUFReader(phi4_gguf)
    return {k: f.contents() for k, f in reader.fields.items()}


# ----------------------------------------------------------------------------- round trips per type

def _block_bound(w: np.ndarray, gguf_type: str) -> np.ndarray:
    """Per-value bound on |decoded - w| for a row-major [rows, cols] tensor in 32-value blocks, from the format:
    Q8_0 stores q = round(x / d), d = max|x| / 127, with d rounded to float16 (relative error <= 2^-11), so
    |err| <= d/2 + 127 * d * 2^-11. Q4_0 takes m = the block's value of largest magnitude, d = m / -8,
    q = min(trunc(x/d + 8.5), 15) and decodes (q - 8) * d: values with x/d <= 7.5 round to the nearest step
    (|err| <= |d|/2), the ones above clip at 7 (|err| <= |d|); plus |q - 8| <= 8 times d's float16 rounding."""
    blocks = w.reshape(w.shape[0], -1, 32).astype(np.float64)
    if gguf_type == "q8_0":
        d = np.abs(blocks).max(-1, keepdims=True) / 127
        bound = d / 2 + 127 * d * 2.0 ** -11 + np.zeros_like(blocks)
    else:
        m = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
        d = m / -8
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(d != 0, blocks / d, 0.0)
        bound = np.abs(d) * np.where(step > 7.5, 1.0, 0.5) + 8 * np.abs(d) * 2.0 ** -11
    return (bound * (1 + 1e-5) + 1e-7).reshape(w.shape)


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0", "q4_0"])
def test_round_trip_ours_gguf_ours(work, small_model, small_ours, gguf_type):
    """ours -> GGUF (type) -> ours -> HF safetensors: f16 and bf16 are bit-identical to NumPy's / ml_dtypes'
    round-to-nearest-even cast of the original weights; q8_0 and q4_0 stay within the bound their block format
    allows (`_block_bound`), but do round (not a float file); norms are exact. A wrong encoding, a dropped
    scale, a sign or nibble-order mistake, or a transposed tensor fails."""
    out = work / f"rt-{gguf_type}.gguf"
    _cli_ok("--to-gguf", small_ours, out, "--type", gguf_type, "--no-tokenizer")
    _cli_ok(out, work / f"rt-{gguf_type}-ours")
    _cli_ok("--to-hf", work / f"rt-{gguf_type}-ours", work / f"rt-{gguf_type}-hf")
    back = hf_tensors(work / f"rt-{gguf_type}-hf")
    original = model_state(small_model)
    assert sorted(back) == sorted(original)
    for name, w in original.items():
        b = back[name]
        assert b.shape == w.shape and b.dtype == np.float32, name
        if w.ndim == 1:
            np.testing.assert_array_equal(b, w, err_msg=name)
        elif gguf_type in ("f16", "bf16"):
            cast = np.float16 if gguf_type == "f16" else ml_dtypes.bfloat16
            np.testing.assert_array_equal(b, w.astype(cast).astype(np.float32), err_msg=name)
        else:
            err = np.abs(b.astype(np.float64) - w)
            kind = "q8_0" if name == "lm_head.weight" else gguf_type  # q4_0 files keep the output layer in q8_0
            bound = _block_bound(w, kind)
            worst = np.unravel_index(np.argmax(err - bound), w.shape)
            assert np.all(err <= bound), f"{name}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
            assert err.max() > 0.2 * bound.max(), f"{name}: no rounding, so the file cannot hold {gguf_type}"


def test_to_gguf_refuses_another_vocabulary_without_no_tokenizer(work, small_ours, capsys):
    expect_cli_error(capsys, work, ["--to-gguf", small_ours], "vocab131.gguf", "131 tokens", "100352",
                     "--no-tokenizer")


# ----------------------------------------------------------------------------- phi-4's tokenizer in the metadata

def test_phi4_tokenizer_metadata(phi4_fields):
    """The keys llama.cpp reads for phi-4 (tokenizer model, pre-tokenizer, special tokens at PHI4.md's ids as
    CONTROL tokens, bos/eos/pad ids, no BOS added), and a chat template that jinja2 renders into PHI4.md's
    chat format."""
    import jinja2

    f = phi4_fields
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "dbrx"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 100352 and len(f["tokenizer.ggml.merges"]) == 100256 - 256
    named = {100256: "<|dummy_0|>", 100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100260: "<|fim_suffix|>",
             100264: "<|im_start|>", 100265: "<|im_end|>", 100266: "<|im_sep|>", 100276: "<|endofprompt|>",
             100349: "<|dummy_85|>", 100351: "<|dummy_87|>"}
    for i, text in named.items():
        assert tokens[i] == text, i
    assert tokens[9906] == "Hello" and tokens[4435] == "ĠWorld" and tokens[198] == "Ċ"  # cl100k ids, GPT-2 bytes
    assert set(types[:100256]) == {int(gguf.TokenType.NORMAL)}
    assert set(types[100256:]) == {int(gguf.TokenType.CONTROL)}
    assert [f[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id", "padding_token_id")] == \
        [100257, 100265, 100349]
    assert (f["tokenizer.ggml.add_bos_token"], f["tokenizer.ggml.add_eos_token"]) == (False, False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    rendered = jinja2.Template(f["tokenizer.chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
                        "<|im_start|>assistant<|im_sep|>Hello.<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|>"
                        "<|im_start|>assistant<|im_sep|>")


def test_gguf_tokens_and_merges_tokenize_like_tiktoken(phi4_fields):
    """A byte-level BPE built by HF `tokenizers` from the file's tokens and merges (cl100k's split regex as
    Hugging Face writes it, `HF_CL100K_SPLIT`; llama.cpp's "dbrx" pre-tokenizer is the same) encodes text, this repository's README included, to exactly the ids
    tiktoken gives with the cl100k_base ranks. A merge missing, out of order or split wrongly, or a token string
    in the wrong alphabet, changes some ids."""
    from pathlib import Path

    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from phi4_jax.tokenizer import Tokenizer

    tokens = phi4_fields["tokenizer.ggml.tokens"][:100256]
    merges = [tuple(m.split(" ")) for m in phi4_fields["tokenizer.ggml.merges"]]
    bpe = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(HF_CL100K_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    tiktoken_encoding = Tokenizer().encoding
    for text in [*TEXTS, readme]:
        want = tiktoken_encoding.encode_ordinary(text)
        got = bpe.encode(text).ids
        assert got == want, text[:60]


def test_gguf_with_phi4_tokenizer_reads_back_exactly(work, phi4_vocab_model, phi4_gguf):
    """Our own f16 GGUF passes the tokenizer check on the way in, with phi-4's ids in the config, and its
    weights come back as the float16 rounding of the original's."""
    from phi4_jax.checkpoint.store import read_checkpoint_config

    _cli_ok(phi4_gguf, work / "phi4v-back")
    config, _ = read_checkpoint_config(work / "phi4v-back")
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (100352, 100257, 100265, 100349)
    _cli_ok("--to-hf", work / "phi4v-back", work / "phi4v-back-hf")
    back = hf_tensors(work / "phi4v-back-hf")
    for name, w in model_state(phi4_vocab_model).items():
        want = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(back[name], want, err_msg=name)


# ----------------------------------------------------------------------------- the embedded-tokenizer check

def _copy_gguf(src, dst, edits):
    """A copy of GGUF `src` with metadata `edits` ({key: new value, or None to drop it}), via the gguf package (read
    with the converter's faster reader: phi-4's 300,000 metadata values)."""
    from phi4_jax.checkpoint.gguf_convert import _open_reader

    _, reader = _open_reader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = edits.get(key, field.contents())
        if value is None:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def other_tokens_gguf(work, phi4_gguf, phi4_fields):
    """phi4_gguf with token 500 changed (not phi-4's tokenizer), the weights unchanged."""
    tokens = list(phi4_fields["tokenizer.ggml.tokens"])
    tokens[500] = "Ġnot-phi4"
    src = work / "other-tokens.gguf"
    _copy_gguf(phi4_gguf, src, {"tokenizer.ggml.tokens": tokens})
    return src


def test_error_embedded_tokenizer_differs(work, other_tokens_gguf, capsys):
    """A phi3 GGUF whose token 500 differs from phi-4's is refused with one line naming the token (nothing
    written); --no-tokenizer-check converts it anyway."""
    src = other_tokens_gguf
    expect_cli_error(capsys, work, [src], "out-other-tokens", "other-tokens.gguf", "not phi-4's", "token 500",
                     "'Ġnot-phi4'", "--no-tokenizer-check")
    _cli_ok(src, work / "out-other-tokens", "--no-tokenizer-check")
    # The same check and override when the file's blocks are kept quantized.
    expect_cli_error(capsys, work, [src], "out-other-tokens-kq", "not phi-4's", "token 500", extra=["--keep-quantized"])
    _cli_ok(src, work / "out-other-tokens-kq", "--keep-quantized", "--no-tokenizer-check")


class _Fields:
    """A stand-in for `gguf.GGUFReader` holding only metadata, for the checks that need no tensors."""

    class _Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    def __init__(self, values):
        self.fields = {k: self._Field(v) for k, v in values.items() if v is not None}


def _swap(seq, i, j):
    seq = list(seq)
    seq[i], seq[j] = seq[j], seq[i]
    return seq


def test_load_model_tokenizer_check_and_override(other_tokens_gguf, phi4_vocab_model):
    """load_model on a .gguf applies the converter's tokenizer check: a file whose token 500 is not phi-4's is a
    one-line CheckpointError naming it and the override; check_tokenizer=False loads it, with the weights the file
    holds (the float16 rounding of the original's)."""
    from phi4_jax import load_model
    from phi4_jax.checkpoint.store import CheckpointError

    with pytest.raises(CheckpointError, match="not phi-4's: token 500") as info:
        load_model(other_tokens_gguf)
    assert "check_tokenizer=False" in str(info.value) and "\n" not in str(info.value)
    model = load_model(other_tokens_gguf, check_tokenizer=False)
    embed = model_state(phi4_vocab_model)["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(model.params["embed"]), embed.astype(np.float16).astype(np.float32))
    # the chat and serve CLIs load through cli.chat.load: the same check, and --no-tokenizer-check to override it
    import argparse

    from phi4_jax.cli.chat import ChatError, add_model_arguments, load

    with pytest.raises(ChatError, match="not phi-4's: token 500"):
        load(str(other_tokens_gguf), None)
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--no-tokenizer-check"])
    cli_model, _ = load(str(other_tokens_gguf), None, check_tokenizer=not args.no_tokenizer_check)
    np.testing.assert_array_equal(np.asarray(cli_model.params["embed"]), np.asarray(model.params["embed"]))


def test_gguf_with_endoftext_as_eos_is_accepted(work, phi4_vocab_ours, phi4_fields):
    """Some phi-4 GGUFs state <|endoftext|> (100257) as eos. The tokenizer check accepts it (phi-4's tokens,
    merges and other ids with that eos), and such a file converts and loads with phi-4's <|im_end|> (100265) as
    eos, so generation (default stop tokens) and chat stop at <|im_end|> and still at <|endoftext|>; a file
    written back states 100265. (A weights-only phi-4-vocabulary file here: parsing the 100352-token list takes
    seconds, and the check is tested on the metadata.) Another eos id is still refused."""
    from pathlib import Path

    from phi4_jax import Tokenizer, load_model
    from phi4_jax.checkpoint.gguf_tokenizer import check_gguf_tokenizer
    from phi4_jax.checkpoint.hf_files import ConversionError
    from phi4_jax.checkpoint.store import read_checkpoint_config
    from phi4_jax.inference.chat_session import chat_stop_tokens
    from phi4_jax.inference.engine import default_stop_tokens

    values = {k: v for k, v in phi4_fields.items() if k.startswith("tokenizer.ggml.")}
    check_gguf_tokenizer(_Fields({**values, "tokenizer.ggml.eos_token_id": 100257}), Path("f.gguf"))
    with pytest.raises(ConversionError, match="eos_token_id is 100266"):
        check_gguf_tokenizer(_Fields({**values, "tokenizer.ggml.eos_token_id": 100266}), Path("f.gguf"))

    weights_only = work / "phi4v-none.gguf"
    _cli_ok("--to-gguf", phi4_vocab_ours, weights_only, "--type", "f32", "--no-tokenizer")
    src = work / "eos-endoftext.gguf"
    _copy_gguf(weights_only, src, {"tokenizer.ggml.eos_token_id": 100257})
    assert gguf.GGUFReader(src).fields["tokenizer.ggml.eos_token_id"].contents() == 100257
    _cli_ok(src, work / "eos-endoftext-ours")
    config, _ = read_checkpoint_config(work / "eos-endoftext-ours")
    model = load_model(src)
    for c in (config, model.config):
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (100257, 100265, 100349)
        assert default_stop_tokens(c) == [100257, 100265]
        assert {100257, 100265} <= set(chat_stop_tokens(c, Tokenizer()))
    _cli_ok("--to-gguf", work / "eos-endoftext-ours", work / "eos-back.gguf", "--no-tokenizer")
    assert gguf.GGUFReader(work / "eos-back.gguf").fields["tokenizer.ggml.eos_token_id"].contents() == 100265


@pytest.mark.parametrize("edit, message", [
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model is 'llama'"),
    ({"tokenizer.ggml.pre": "gpt-2"}, "tokenizer.ggml.pre is 'gpt-2'"),
    ({"tokenizer.ggml.tokens": lambda t: t[:100300]}, "100300 tokens, phi-4 has 100352"),
    ({"tokenizer.ggml.tokens": lambda t: _swap(t, 100264, 100265)}, "token 100264 is '<|im_end|>'"),
    ({"tokenizer.ggml.merges": lambda m: _swap(m, 10, 20)}, "merge order differs"),
    ({"tokenizer.ggml.merges": lambda m: m[:-1]}, "is missing"),
    ({"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
    ({"tokenizer.ggml.eos_token_id": 100266}, "tokenizer.ggml.eos_token_id is 100266, phi-4's is 100265 "
                                              "(<|im_end|>) or 100257 (<|endoftext|>)"),
    ({"tokenizer.ggml.bos_token_id": 1}, "tokenizer.ggml.bos_token_id is 1, phi-4's is 100257"),
])
def test_tokenizer_check_names_each_difference(phi4_fields, edit, message):
    """Each way a file's tokenizer can differ from phi-4's is one ConversionError naming it; extra redundant
    merges (as Hugging Face's tiktoken conversion lists) and a file without a tokenizer pass."""
    from pathlib import Path

    from phi4_jax.checkpoint.gguf_tokenizer import check_gguf_tokenizer
    from phi4_jax.checkpoint.hf_files import ConversionError

    values = {k: v for k, v in phi4_fields.items() if k.startswith("tokenizer.ggml.")}
    for key, change in edit.items():
        values[key] = change(values[key]) if callable(change) else change
    with pytest.raises(ConversionError, match="not phi-4's") as info:
        check_gguf_tokenizer(_Fields(values), Path("f.gguf"))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "--no-tokenizer-check" in str(info.value) and "check_tokenizer=False" in str(info.value)


def test_tokenizer_check_passes_phi4_and_tokenizer_free_files(phi4_fields):
    from pathlib import Path

    from phi4_jax.checkpoint.gguf_tokenizer import check_gguf_tokenizer

    values = {k: v for k, v in phi4_fields.items() if k.startswith("tokenizer.ggml.")}
    check_gguf_tokenizer(_Fields(values), Path("f.gguf"))
    merges = values["tokenizer.ggml.merges"]
    extra = [*merges[:5], "Ġ ĠĠĠ", *merges[5:]]  # a redundant split of a token, listed after its merge
    check_gguf_tokenizer(_Fields({**values, "tokenizer.ggml.merges": extra}), Path("f.gguf"))
    check_gguf_tokenizer(_Fields({"tokenizer.ggml.model": "none"}), Path("f.gguf"))
    check_gguf_tokenizer(_Fields({}), Path("f.gguf"))


# ----------------------------------------------------------------------------- llama.cpp itself

# llama.cpp's CPU matmuls with f16 weights round the activations to f16 too (relative 2^-11 per value), and its
# attention and norms are its own kernels; ours computes in float32 on the same weights. Measured on this test's
# model: 1.7e-3 of max |logit|; a wrong layout or a missing norm gives errors of order 1.
LLAMA_CPP_F16_BOUND = 5e-3


@pytest.fixture(scope="module")
def phi4_gguf_back(work, phi4_gguf):
    """Our checkpoint of exactly the weights phi4_gguf holds (read back from it)."""
    back = work / "phi4v-back-llama"
    _cli_ok(phi4_gguf, back)
    return back


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (`pip install -e .[llamacpp]` builds llama.cpp "
                            "from source, over 10 minutes); bench/llamacpp_check.py runs the same checks")


def test_llama_cpp_runs_our_gguf(llama_cpp, phi4_gguf, phi4_gguf_back, phi4_fields):
    """llama.cpp (llama-cpp-python) loads our f16 GGUF and: tokenizes text as tiktoken does and chat-format text
    into phi-4's special ids; renders the chat template into phi-4's format; gives the logits of a 64-token
    prompt (token ids) and of its 16 greedy tokens that ours gives on the same weights, to f16 activation
    rounding; and greedy-decodes the same tokens (where they part, only at a near-tie within that rounding). A wrong tokenizer key, merge, special-token type, tensor name or layout fails here."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from phi4_jax import Tokenizer, generate, load_model

    llm = llama_cpp.Llama(str(phi4_gguf), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    tok = Tokenizer()
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode_ordinary(text), text[:40]
    chat = "<|im_start|>user<|im_sep|>Hi there<|im_end|><|im_start|>assistant<|im_sep|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat)
    formatter = Jinja2ChatFormatter(phi4_fields["tokenizer.chat_template"], eos_token="<|im_end|>",
                                    bos_token="<|endoftext|>", add_generation_prompt=True)
    assert formatter(messages=[{"role": "user", "content": "Hi there"}]).prompt == chat

    prompt = np.random.default_rng(5).integers(0, 100256, 64).tolist()
    model = load_model(phi4_gguf_back)
    theirs = []
    llm.eval(prompt)
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    seq = prompt + theirs[:-1]  # both sides' logits along llama.cpp's greedy sequence
    theirs_logits = np.asarray(llm.scores[:len(seq)], np.float32)
    ours_logits = np.asarray(model(np.asarray([seq], np.int32)))[0]
    assert np.std(ours_logits) > 0.5, "reference logits are too flat to be a meaningful check"
    scale = float(np.max(np.abs(ours_logits)))
    err = float(np.max(np.abs(ours_logits - theirs_logits))) / scale
    assert err <= LLAMA_CPP_F16_BOUND, f"llama.cpp vs ours on the same f16 weights: {err:.2e}"
    ours = generate(model, [prompt], max_new_tokens=16, stop_tokens=[])[0]
    split = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if split is not None:  # only a near-tie, within both sides' logit difference, may decide differently
        row = ours_logits[len(prompt) - 1 + split]
        margin = float(row[ours[split]] - row[theirs[split]]) / scale
        assert margin <= 2 * err, f"greedy tokens differ at {split} where ours was clear by {margin:.2e}"
