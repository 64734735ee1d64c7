"""Decontamination on small hand-made evaluation and training sets: each removal (and each keep) asserted by content."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phi4_jax.cli import decontaminate as cli
from phi4_jax.data import decontaminate as dc

LONG_Q = ("A train leaves the station at nine in the morning travelling at sixty miles per hour toward the coast "
          "and stops twice on the way; when does it arrive?")               # 29 words: matched by 13-grams
SHORT_Q = "What is the capital city of Burkina Faso today?"                  # 9 words: matched by 7-grams too
TINY_Q = "Name a prime."                                                     # 3 words: cannot be matched
LONG_13 = "at nine in the morning travelling at sixty miles per hour toward the"   # words 7..19 of LONG_Q


def test_words_and_ngram_hashes_follow_their_definition():
    assert dc.words("Hello, WORLD!  The ﬁne-tuned\tmodel") == ["hello", "world", "the", "fine", "tuned", "model"]
    ws = "one two three four five".split()
    h = dc.word_hashes(ws)
    assert int(h[1]) == int.from_bytes(hashlib.blake2b(b"two", digest_size=8).digest(), "little")
    assert [int(x) for x in dc.word_hashes(["five", "six", "two"])] == [int(h[4]), int.from_bytes(
        hashlib.blake2b(b"six", digest_size=8).digest(), "little"), int(h[1])]     # memoized and new words alike
    p, mask = 0x100000001B3, 2**64 - 1
    want = [(int(h[i]) * p * p + int(h[i + 1]) * p + int(h[i + 2])) & mask for i in range(3)]
    assert [int(x) for x in dc.ngram_hashes(h, 3)] == want
    assert len(dc.ngram_hashes(h, 6)) == 0


@pytest.fixture()
def sets(tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(x) + "\n" for x in [
        {"question": LONG_Q, "answer": "noon"}, {"question": SHORT_Q}, {"question": TINY_Q}]))
    docs = {
        "long_match": {"text": "Word problems. " + LONG_13.upper().replace(" sixty", ", sixty") + " ... and more."},
        "twelve_words": {"text": "Almost: " + " ".join(LONG_13.split()[:12]) + " but not quite."},
        "short_match": {"text": "Quiz night: the capital city of Burkina Faso today is Ouagadougou."},
        "six_words": {"text": "We visited the capital city of Burkina Faso in May."},
        "tiny_item": {"text": "Name a prime. Seven is one."},
        "chat": {"messages": [{"role": "user", "content": "Help me"},
                              {"role": "assistant", "content": "Sure: what is the capital city of Burkina Faso today"}]},
        "dpo": {"prompt": [{"role": "user", "content": "q"}], "chosen": "clean answer",
                "rejected": "when " + LONG_13 + " then"},
        # an eval 13-gram split across two neighbouring documents (hashed in one batch) matches neither
        "tail_half": {"text": "It ends with " + " ".join(LONG_13.split()[:7])},
        "head_half": {"text": " ".join(LONG_13.split()[7:]) + " starts this one."},
        "clean": {"text": "Once upon a time there was a cat."},
    }
    lines = [json.dumps(v) for v in docs.values()]
    lines.insert(3, "{broken json")
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    return eval_path, train, docs, lines


def run(args):
    return cli.main(args + ["--no-progress"])


def test_hybrid_13_and_7_grams_remove_exactly_the_contaminated_documents(sets, tmp_path):
    eval_path, train, docs, lines = sets
    out = tmp_path / "out"
    assert run(["--eval", str(eval_path), "--input", str(train), "--out", str(out), "--workers", "1"]) == 0
    kept = (out / "train.jsonl").read_text().splitlines()
    assert kept == [json.dumps(docs[k]) for k in ("twelve_words", "six_words", "tiny_item", "tail_half", "head_half",
                                                  "clean")]
    report = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r for r in report}
    line_of = {k: lines.index(json.dumps(v)) + 1 for k, v in docs.items()}
    assert by_line[line_of["long_match"]] == {"input": str(train), "line": line_of["long_match"],
                                              "eval_file": str(eval_path), "eval_line": 1, "n": 13,
                                              "ngram": LONG_13}
    assert by_line[line_of["short_match"]]["eval_line"] == 2 and by_line[line_of["short_match"]]["n"] == 7
    assert by_line[line_of["short_match"]]["ngram"] == "the capital city of burkina faso today"
    assert by_line[line_of["chat"]]["eval_line"] == 2
    assert by_line[line_of["dpo"]]["eval_line"] == 1 and by_line[line_of["dpo"]]["n"] == 13
    assert by_line[4] == {"input": str(train), "line": 4, "skipped": "not valid JSON (Expecting property name "
                                                                       "enclosed in double quotes)"}
    assert len(report) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["items"] == 2 and summary["eval"]["too_short"] == 1 and summary["eval"]["short"] == 1
    assert summary["inputs"][0] == {"input": str(train), "output": str(out / "train.jsonl"), "documents": 11,
                                         "kept": 6, "removed": 4, "skipped": 1}


def test_field_restricts_the_checked_text(sets, tmp_path):
    eval_path, train, docs, lines = sets
    chat_only = tmp_path / "sft.jsonl"
    chat_only.write_text(json.dumps(docs["chat"]) + "\n" + json.dumps({"messages": [], "source": SHORT_Q}) + "\n")
    out = tmp_path / "out"
    assert run(["--eval", str(eval_path), "--input", str(chat_only), "--out", str(out), "--field", "messages",
                "--workers", "1"]) == 0
    # the contaminated "source" field is not a message: with --field messages it is not checked
    assert (out / "sft.jsonl").read_text().splitlines() == [json.dumps({"messages": [], "source": SHORT_Q})]


def test_text_and_parquet_inputs_and_a_process_pool_give_the_same_result(sets, tmp_path):
    eval_path, _, docs, _ = sets
    texts = [docs[k].get("text", "") for k in ("long_match", "twelve_words", "short_match", "clean")]
    txt = tmp_path / "web.txt"
    txt.write_text("\n".join(texts) + "\n")
    parquet = tmp_path / "web.parquet"
    pq.write_table(pa.table({"text": texts, "id": np.arange(4)}), parquet)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert run(["--eval", str(eval_path), "--input", str(txt), str(parquet), "--out", str(out),
                    "--workers", str(workers)]) == 0
        outs[workers] = ((out / "web.txt").read_text(), pq.read_table(out / "web.parquet").to_pydict(),
                         (out / "report.jsonl").read_text())
    assert outs[1] == outs[2]
    assert outs[1][0].splitlines() == [texts[1], texts[3]]
    assert outs[1][1] == {"text": [texts[1], texts[3]], "id": [1, 3]}


def test_bad_input_gets_one_clear_line(sets, tmp_path, capsys):
    eval_path, train, _, _ = sets
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    only_tiny = tmp_path / "tiny.txt"
    only_tiny.write_text("Name a prime.\nYes or no?\n")
    out = str(tmp_path / "out")
    cases = [
        (["--eval", str(empty), "--input", str(train)], f"error: evaluation set {empty} has no item"),
        (["--eval", str(only_tiny), "--input", str(train)], f"error: evaluation set {only_tiny} has no item"),
        (["--eval", str(tmp_path / "nope.jsonl"), "--input", str(train)], "nope.jsonl: no such file"),
        (["--eval", str(eval_path), "--input", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such input file"),
        (["--eval", str(eval_path), "--input", str(eval_path.with_suffix(".csv"))], "no such input file"),
        (["--eval", str(eval_path.with_suffix(".csv")), "--input", str(train)], "no such file"),
    ]
    for extra, message in cases:
        assert run(extra + ["--out", out]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    assert run(["--eval", str(eval_path), "--input", str(csv), "--out", out]) == 2
    assert "unknown format '.csv'" in capsys.readouterr().err
    assert run(["--eval", str(eval_path), "--input", str(train), "--out", str(train.parent)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
