"""Pre-tokenized shards (phi4_jax.data.shards, python -m phi4_jax.data.tokenize): round trip against the phi-4
tokenizer, resume after a killed run, multi-host coverage, token-weighted mixing, and bad input."""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from phi4_jax.data import pipeline, shards
from phi4_jax.data.sources import DataError
from phi4_jax.special_tokens import ENDOFTEXT_ID
from phi4_jax.tokenizer import Tokenizer
from phi4_jax.train.config import DataConfig, SourceConfig, TrainConfigError, build_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the of and a to in is was for on that with as by at from it an be this are café 数学 ∑ 🙂".split()
SHARD_TOKENS = 3000


def _text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Source files (short jsonl documents in two files, long text and parquet documents, an npy stream) and
    their documents' texts (or ids) in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    short = [[_text(rng, 3, 40) for _ in range(250)] for _ in range(2)]
    for i, docs in enumerate(short):
        (root / f"short{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    long = [_text(rng, 300, 700) for _ in range(20)]
    (root / "long.txt").write_text("\n\n".join(long) + "\n")
    table = [_text(rng, 50, 120) for _ in range(60)]
    pq.write_table(pa.table({"text": table}), root / "table.parquet")
    stream = np.concatenate([np.append(np.arange(1 + i, 40 + 7 * i), ENDOFTEXT_ID) for i in range(30)]).astype(np.int32)
    np.save(root / "ids.npy", stream)
    return {"root": root, "short": short[0] + short[1], "long": long, "table": table,
            "ids": np.split(stream, np.flatnonzero(stream == ENDOFTEXT_ID)[:-1] + 1)}


def _sources(root):
    return [shards.CorpusSource("short", "jsonl", str(root / "short*.jsonl")),
            shards.CorpusSource("long", "text", str(root / "long.txt")),
            shards.CorpusSource("table", "parquet", str(root / "table.parquet")),
            shards.CorpusSource("ids", "npy", str(root / "ids.npy"))]


@pytest.fixture(scope="module")
def tokenized(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tokenized") / "out")
    manifest = shards.tokenize_corpus(_sources(corpus["root"]), out, shard_tokens=SHARD_TOKENS, workers=2,
                                      progress=False, log=lambda m: None)
    return out, manifest


@pytest.fixture(scope="module")
def phi4():
    from phi4_jax.data.tokenizing import Phi4TextTokenizer

    return Phi4TextTokenizer()


def _source_docs(out, name, phi4):
    src = shards.TokenizedSource(os.path.join(out, "manifest.json"), name, tokenizer_fingerprint=phi4.fingerprint)
    return [src[i]["tokens"] for i in range(len(src))]


def test_shards_round_trip_to_the_documents_token_ids(corpus, tokenized, phi4):
    out, manifest = tokenized
    tok = Tokenizer()
    for name in ("short", "long", "table"):
        want = [tok.encode_ordinary(t) + [ENDOFTEXT_ID] for t in corpus[name]]
        got = _source_docs(out, name, phi4)
        assert [g.tolist() for g in got] == want, name
        entry = manifest["sources"][name]
        assert entry["documents"] == len(want) and entry["tokens"] == sum(map(len, want))
    assert [g.tolist() for g in _source_docs(out, "ids", phi4)] == [d.tolist() for d in corpus["ids"]]
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    assert len(manifest["sources"]["short"]["files"]) == 2
    for entry in manifest["sources"].values():
        for s in entry["shards"]:
            with open(os.path.join(out, s["path"]), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == s["sha256"]
        # fixed-size shards: each closes at the first document end at or past SHARD_TOKENS; a file's last
        # shard may be smaller
        for s, nxt in zip(entry["shards"], entry["shards"][1:]):
            if nxt["file"] == s["file"]:
                assert s["tokens"] >= SHARD_TOKENS
    assert len(manifest["sources"]["long"]["shards"]) > 2


def test_resume_after_a_killed_run_skips_finished_shards(corpus, tokenized, tmp_path):
    out, manifest = tokenized
    # what a run killed midway leaves: no manifest, the log of its finished shards (the last line cut
    # short), a shard it was writing under its temporary name, and one renamed but not yet logged
    killed = str(tmp_path / "killed")
    shutil.copytree(out, killed)
    os.remove(os.path.join(killed, "manifest.json"))
    with open(os.path.join(killed, "progress.jsonl")) as f:
        lines = f.read().splitlines()
    kept = [json.loads(line)["shard"] for line in lines[1:] if "shard" in json.loads(line)][:3]
    keep_lines = [lines[0]] + [json.dumps({"shard": s}) for s in kept]
    with open(os.path.join(killed, "progress.jsonl"), "w") as f:
        f.write("\n".join(keep_lines) + "\n" + lines[-1][:20])
    logged = {s["path"] for s in kept}
    unlogged = [s for e in manifest["sources"].values() for s in e["shards"] if s["path"] not in logged]
    with open(os.path.join(killed, unlogged[0]["path"]), "wb") as f:
        f.write(b"half a shard")
    with open(os.path.join(killed, unlogged[1]["path"]) + ".tmp", "wb") as f:
        f.write(b"half a shard")
    mtimes = {p: os.stat(os.path.join(killed, p)).st_mtime_ns for p in logged}

    result = subprocess.run(
        [sys.executable, "-m", "phi4_jax.data.tokenize", "--source", f"short=jsonl:{corpus['root']}/short*.jsonl",
         "--source", f"long=text:{corpus['root']}/long.txt", "--source",
         f"table=parquet:{corpus['root']}/table.parquet", "--source", f"ids=npy:{corpus['root']}/ids.npy",
         "--out", killed, "--shard-tokens", str(SHARD_TOKENS), "--workers", "1", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming: 3 shards and 0 files already done" in result.stderr
    with open(os.path.join(killed, "manifest.json")) as f:
        assert json.load(f) == manifest   # the same shards, byte for byte (same checksums)
    assert {p: os.stat(os.path.join(killed, p)).st_mtime_ns for p in logged} == mtimes   # not rewritten
    assert not any(name.endswith(".tmp") for _, _, files in os.walk(killed) for name in files)


def test_hosts_read_disjoint_complete_shares(tokenized, phi4):
    out, manifest = tokenized
    cfg = DataConfig(tokenizer="phi4", sources=(
        SourceConfig(name="long", type="tokenized", path=os.path.join(out, "manifest.json"), weight=1),))
    n_docs = manifest["sources"]["long"]["documents"]
    everything = sorted(d.tobytes() for d in _source_docs(out, "long", phi4))
    for hosts in (1, 3):
        seen = []
        for h in range(hosts):
            docs = pipeline.mixed_documents(cfg, phi4, phi4.vocab_size, h, hosts)
            share = len(range(h, n_docs, hosts))   # host h's documents, before its stream repeats
            seen += [docs[i]["input_ids"].tobytes() for i in range(share)]
        assert sorted(seen) == everything


def test_resume_on_another_host_count_is_refused(tmp_path):
    """A checkpoint's data iterators written by 2 hosts (grain names each host's file process_I-of-N.json) do
    not restore on 1 host: the trainer's restore refuses before reading anything."""
    import grain
    import jax.numpy as jnp

    from phi4_jax.train.checkpoints import TrainCheckpointer

    ckpt = TrainCheckpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(data)
    ckpt.save(1, {"x": jnp.zeros(2)}, data)
    ckpt.wait()
    state, step = ckpt.restore({"x": jnp.zeros(2)}, iter(grain.MapDataset.range(10).to_iter_dataset()))
    assert step == 1   # same host count: restores
    data_dir = tmp_path / "checkpoints" / "1" / "data"
    os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
    (data_dir / "process_1-of-2.json").write_text("{}")
    with pytest.raises(DataError, match=r"saved by 2 host\(s\) but this run has 1: .*Resume on the same number"):
        ckpt.restore({"x": jnp.zeros(2)}, iter(grain.MapDataset.range(10).to_iter_dataset()))
    ckpt.close()


def test_token_weighting_gives_token_shares_and_document_weighting_document_shares(tokenized, phi4):
    out, manifest = tokenized
    mean = {n: manifest["sources"][n]["tokens"] / manifest["sources"][n]["documents"] for n in ("short", "long")}
    assert mean["long"] > 20 * mean["short"]   # very different document lengths
    path = os.path.join(out, "manifest.json")
    cfg = DataConfig(tokenizer="phi4", shuffle_seed=1, sources=(
        SourceConfig(name="short", type="tokenized", path=path, weight=3),
        SourceConfig(name="long", type="tokenized", path=path, weight=1)))
    it = iter(pipeline.packed_batches(cfg, phi4, phi4.vocab_size, 512, 8))
    counts = sum(next(it)["source_tokens"].sum(0) for _ in range(40))   # 164K tokens
    np.testing.assert_allclose(counts / counts.sum(), [0.75, 0.25], atol=0.03)

    by_docs = dataclasses.replace(cfg, mixture_weighting="documents")
    docs = pipeline.mixed_documents(by_docs, phi4, phi4.vocab_size)
    sources = np.bincount([int(docs[i]["source"]) for i in range(2000)], minlength=2)
    np.testing.assert_allclose(sources / 2000, [0.75, 0.25], atol=0.01)
    it = iter(pipeline.packed_batches(by_docs, phi4, phi4.vocab_size, 512, 8))
    counts = sum(next(it)["source_tokens"].sum(0) for _ in range(10))
    assert counts[1] / counts.sum() > 0.8   # by documents, the long source dominates the tokens


def test_corrupt_shard_and_other_tokenizer_are_refused(tokenized, phi4, tmp_path):
    out, _ = tokenized
    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    manifest_path = os.path.join(bad, "manifest.json")
    manifest = json.load(open(manifest_path))
    victim = os.path.join(bad, manifest["sources"]["table"]["shards"][0]["path"])
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 1
    open(victim, "wb").write(bytes(data))
    cfg = DataConfig(tokenizer="phi4", sources=(SourceConfig(name="table", type="tokenized", path=manifest_path,
                                                             weight=1),))
    with pytest.raises(DataError, match=r"shard .*00000-00000.array_record has sha256 .* the manifest says"):
        pipeline.packed_batches(cfg, phi4, phi4.vocab_size, 64, 2)
    with pytest.raises(DataError, match="made with another tokenizer"):
        shards.TokenizedSource(os.path.join(out, "manifest.json"), "table", tokenizer_fingerprint="0" * 64)
    with pytest.raises(DataError, match="has no source 'web'; it has"):
        shards.TokenizedSource(os.path.join(out, "manifest.json"), "web", tokenizer_fingerprint=phi4.fingerprint)
    manifest["sources"]["table"].update(documents=0, tokens=0, shards=[])
    empty_path = os.path.join(bad, "empty.json")
    with open(empty_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(DataError, match="tokenized source 'table' in '.*empty.json' has no documents"):
        shards.TokenizedSource(empty_path, "table", tokenizer_fingerprint=phi4.fingerprint)
    # the demo's compact tokenizer numbers tokens differently: its fingerprint differs from phi-4's
    from phi4_jax.data.tokenizing import CompactTokenizer
    assert CompactTokenizer([5, 6, 7]).fingerprint != phi4.fingerprint


def test_bad_weights_and_empty_sources_are_refused(corpus, tokenized, tmp_path):
    base = {"data": {"tokenizer": "phi4", "sources": [{"name": "a", "type": "jsonl", "path": "x.jsonl"}]}}
    for weight in (0, -1.0, float("nan")):
        base["data"]["sources"][0]["weight"] = weight
        with pytest.raises(TrainConfigError, match="'a': weight must be positive"):
            build_train_config(base)
    base["data"]["sources"][0]["weight"] = 1
    base["data"]["mixture_weighting"] = "bytes"
    with pytest.raises(TrainConfigError, match="mixture_weighting must be one of"):
        build_train_config(base)
    with pytest.raises(DataError, match="'a': mixture weight must be positive"):
        pipeline.mixture_weights(DataConfig(sources=(SourceConfig(name="a", type="demo", weight=0),)), [1.0])

    # a source with no documents: a clear error, no manifest; a finished corpus is never touched
    (tmp_path / "empty.jsonl").write_text("\n")
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"source 'empty', file .*empty.jsonl: .*has no records"):
        shards.tokenize_corpus([shards.CorpusSource("empty", "jsonl", str(tmp_path / "empty.jsonl"))], out,
                               progress=False, log=lambda m: None)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    done = str(tmp_path / "done")
    shutil.copytree(tokenized[0], done)
    def contents():
        return {os.path.join(root, name): open(os.path.join(root, name), "rb").read()
                for root, _, files in os.walk(done) for name in files}

    before = contents()
    again = shards.tokenize_corpus(_sources(corpus["root"]), done, shard_tokens=SHARD_TOKENS, progress=False,
                                   log=lambda m: None)
    assert again == tokenized[1]   # finished: returned as it is
    for changed in ({"shard_tokens": SHARD_TOKENS + 1, "corpus": _sources(corpus["root"])},
                    {"shard_tokens": SHARD_TOKENS, "corpus": _sources(corpus["root"])[1:]}):
        with pytest.raises(DataError, match="already holds a different tokenized corpus"):
            shards.tokenize_corpus(changed["corpus"], done, shard_tokens=changed["shard_tokens"], progress=False,
                                   log=lambda m: None)
    assert contents() == before   # nothing already written is touched


def test_shards_in_a_bucket_round_trip(corpus, tokenized, phi4, gcs, tmp_path, monkeypatch):
    """Sources and output in a bucket of a GCS API emulator on 127.0.0.1; training reads the bucket's manifest
    (each shard downloaded once, verified, into the local cache)."""
    from phi4_jax import paths

    out, manifest = tokenized
    bucket = f"gs://{gcs.bucket()}"
    paths.write_atomic(f"{bucket}/src/long.txt", (corpus["root"] / "long.txt").read_bytes())
    remote = shards.tokenize_corpus([shards.CorpusSource("long", "text", f"{bucket}/src/*.txt")], f"{bucket}/tok",
                                    shard_tokens=SHARD_TOKENS, progress=False, log=lambda m: None)
    assert [s["sha256"] for s in remote["sources"]["long"]["shards"]] == \
        [s["sha256"] for s in manifest["sources"]["long"]["shards"]]   # the same bytes as on local disk
    monkeypatch.setenv("PHI4_JAX_SHARD_CACHE", str(tmp_path / "cache"))
    src = shards.TokenizedSource(f"{bucket}/tok/manifest.json", "long", tokenizer_fingerprint=phi4.fingerprint)
    assert [src[i]["tokens"].tolist() for i in range(len(src))] == \
        [d.tolist() for d in _source_docs(out, "long", phi4)]
    assert len(os.listdir(tmp_path / "cache")) == len(remote["sources"]["long"]["shards"])


def test_killed_cli_run_resumes_to_the_same_documents(tmp_path, phi4):
    """A real kill: the CLI's process group gets SIGKILL once shards are logged; the same command then finishes
    the corpus, and the shards hold exactly the documents' token ids."""
    import signal
    import time

    rng = random.Random(1)
    texts = [_text(rng, 50, 150) for _ in range(3000)]
    for f in range(6):
        (tmp_path / f"part{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[f::6]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "phi4_jax.data.tokenize", "--source", f"web=jsonl:{tmp_path}/part*.jsonl",
           "--out", str(out), "--shard-tokens", "1000", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = out / "progress.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"shard"') >= 2:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "manifest.json").exists()   # killed midway (~450K tokens remained)
    finished = log.read_text().count('"shard"')

    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {finished} shards" in result.stderr
    got = [d.tolist() for d in _source_docs(str(out), "web", phi4)]
    files = [texts[f::6] for f in range(6)]
    assert got == [phi4.encode_document(t).tolist() for f in files for t in f]
