"""`python -m phi4_jax.chat` end to end, through the real CLI in a subprocess, on a tiny converted checkpoint.

The tiny model has phi-4's vocabulary size (100352) and special token ids, so the real tokenizer and chat
format apply; its hidden size is tiny so it converts and compiles quickly. Its answers are random text, so
the test compares the CLI's streamed answer with `phi4_jax.inference.chat_session.chat` run in-process.
"""

import io
import json
import os
import subprocess
import sys

import pytest
from hf_models import make_tiny_phi3_model, save_phi3_dir

import phi4_jax
from phi4_jax.inference import chat_session as generation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "JAX_PLATFORMS": "cpu"}
SYSTEM = "You are a terse assistant."


def make_chat_checkpoint(root):
    """A tiny random Phi3ForCausalLM with phi-4's vocab and token ids, converted with convert_weights.py."""
    hf = make_tiny_phi3_model(seed=5, hidden=32, heads=4, kv_heads=2, layers=2, intermediate=64, vocab=100352)
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = 100257, 100265, 100349
    hf_dir = save_phi3_dir(hf, root / "hf", fmt="safetensors")
    dst = root / "ckpt"
    proc = subprocess.run([sys.executable, "convert_weights.py", str(hf_dir), str(dst)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((dst / "config.json").read_text())["eos_token_id"] == 100265
    return dst


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat"))


def run_chat(*args, stdin=""):
    """Runs the CLI; stdout/stderr decoded as UTF-8 without newline translation (answers may hold a \\r)."""
    proc = subprocess.run([sys.executable, "-m", "phi4_jax.chat", *args], cwd=ROOT, env=ENV,
                          input=stdin.encode(), capture_output=True, timeout=300)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


@pytest.fixture(scope="module")
def chat_model(checkpoint):
    return phi4_jax.load_model(checkpoint), phi4_jax.Tokenizer()


def test_prompt_answers_once_and_matches_in_process_chat(checkpoint, chat_model):
    proc = run_chat("--checkpoint", str(checkpoint), "--system", SYSTEM, "--prompt", "Hello! Who are you?",
                    "--max-new-tokens", "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tokenizer = chat_model
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello! Who are you?"}]
    expected = generation.chat_reply(model, tokenizer, messages, max_new_tokens=24)
    assert expected  # a random model still says something
    assert proc.stdout == expected
    assert "tokens/s" in proc.stderr


def full_reprefill_answers(model, tokenizer, argv, messages, max_context):
    """Answers to successive user messages, each re-prefilling the whole (trimmed) conversation (`generate`)."""
    from phi4_jax.cli.chat import Conversation, parse_args

    args = parse_args(argv)
    conversation = Conversation(tokenizer, args.system, max_context)
    stops = generation.chat_stop_tokens(model.config, tokenizer)
    texts = []
    for message in messages:
        ids = conversation.prompt_for(message)
        text = generation.generate_text_from_ids(
            model, tokenizer, ids, max_new_tokens=min(args.max_new_tokens, max_context - len(ids)),
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops)
        conversation.add_answer(text)
        texts.append(text)
    return texts


def test_interactive_multi_turn_exits_cleanly_on_eof(checkpoint, chat_model):
    """Two turns through the CLI (cache kept between them) stream the answers of a full re-prefill per turn."""
    proc = run_chat("--checkpoint", str(checkpoint), "--max-new-tokens", "8", stdin="Hi there\n\nTell me more\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("tokens/s") == 2  # two answers, then Ctrl-D (EOF) ends the chat
    assert proc.stdout.count("> ") == 4  # prompts: two messages, one empty line (skipped), then EOF
    first, second = full_reprefill_answers(*chat_model, ["--checkpoint", str(checkpoint), "--max-new-tokens", "8"],
                                           ["Hi there", "Tell me more"], 16384)
    assert first and second
    assert proc.stdout == "\n> " + first + "\n> \n> " + second + "\n> "


def test_cached_session_equals_full_reprefill_when_turns_are_dropped(checkpoint, chat_model):
    """In-process chat turns with a small --max-context: the session reuses its held pages while the
    conversation fits, keeps only the system prompt's part when the oldest turns are dropped, and answers like a
    full re-prefill."""
    from phi4_jax.cli.chat import Conversation, answer, new_session, parse_args

    model, tokenizer = chat_model
    max_context = 72
    argv = ["--checkpoint", str(checkpoint), "--system", SYSTEM, "--max-new-tokens", "10",
            "--max-context", str(max_context)]
    messages = ["Hello there, how are you?", "Tell me more about it.", "And then what happened next?",
                "Thanks!"]
    expected = full_reprefill_answers(model, tokenizer, argv, messages, max_context)
    args = parse_args(argv)
    conversation = Conversation(tokenizer, args.system, max_context)
    session = new_session(model, tokenizer, args, max_context)
    turns = []
    for message, want in zip(messages, expected):
        ids = conversation.prompt_for(message)
        text, stats = answer(session, tokenizer, ids, args, max_context, out=io.StringIO())
        conversation.add_answer(text)
        assert text == want
        assert stats["tokens"] >= 1 and stats["time_to_first_token"] <= stats["seconds"]
        turns.append(dict(session.last_turn, history=len(conversation.turns), prompt=len(ids)))
    untrimmed = [t for prev, t in zip(turns, turns[1:]) if t["history"] > prev["history"]]
    trimmed = [(prev, t) for prev, t in zip(turns, turns[1:]) if t["history"] <= prev["history"]]
    assert untrimmed and all(not t["rebuilt"] and t["reused"] > 0 for t in untrimmed), turns   # pages reused ...
    system = len(tokenizer.encode_chat([{"role": "system", "content": SYSTEM}]))
    assert trimmed and all(system <= t["reused"] < prev["prompt"] for prev, t in trimmed), turns  # ... and cut


def test_bad_checkpoint_path_is_a_clear_error(tmp_path):
    proc = run_chat("--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint directory {str(tmp_path / 'nope')!r} does not exist "
        "(convert one with: python convert_weights.py HF_DIR DST_DIR)"]
    (tmp_path / "empty").mkdir()
    proc = run_chat("--checkpoint", str(tmp_path / "empty"), "--prompt", "hi")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: cannot load checkpoint")


def test_conversation_drops_oldest_turns_to_fit():
    from phi4_jax.cli.chat import ChatError, Conversation

    tokenizer = phi4_jax.Tokenizer()
    conv = Conversation(tokenizer, "sys", max_context=30)
    first = conv.prompt_for("one two three four five")
    assert len(first) == len(tokenizer.encode_chat([{"role": "system", "content": "sys"},
                                                    {"role": "user", "content": "one two three four five"}]))
    conv.add_answer("six seven eight nine ten")
    ids = conv.prompt_for("eleven twelve")  # the whole history (33 tokens) no longer fits in 30
    assert conv.turns == [{"role": "user", "content": "eleven twelve"}]
    assert ids == tokenizer.encode_chat([{"role": "system", "content": "sys"}] + conv.turns)
    with pytest.raises(ChatError, match="message too long"):
        conv.prompt_for("word " * 100)


def test_text_streamer_holds_back_split_utf8_characters():
    tokenizer = phi4_jax.Tokenizer()
    text = "naïve café: 日本語のテキスト 🙂🚀 done"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some tokens are partial characters
    pieces = []
    streamer = generation.TextStreamer(tokenizer, pieces.append, skip_tokens=tokenizer.stop_ids)
    for t in ids + [tokenizer.im_end_id, None]:
        streamer.put(t)
    streamer.flush()
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_quantize_options_load_a_quantized_model(checkpoint):
    """`--quantize int4 --group-size 32` reach load_model: the chat runs on int4 weights."""
    from phi4_jax.cli.chat import load, parse_args
    from phi4_jax.quant.weights import QuantizedWeight

    args = parse_args(["--checkpoint", str(checkpoint), "--quantize", "int4", "--group-size", "32"])
    model, _ = load(args.checkpoint, args.dtype, args.quantize, args.group_size)
    q_proj = model.params["layers"]["q_proj"]
    assert isinstance(q_proj, QuantizedWeight) and (q_proj.bits, q_proj.group_size) == (4, 32)
