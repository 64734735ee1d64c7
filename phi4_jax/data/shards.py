"""Pre-tokenized corpora: token shards in ArrayRecord files, their manifest, writing them on several processes
(resumable), and reading them back as a training source (`type = "tokenized"`).

Why ArrayRecord: it is grain's native random-access format (`grain.sources.ArrayRecordDataSource`). Training
shuffles, host-shards and checkpoints documents by index, and ArrayRecord reaches any record through the index
in its footer, so each host reads only its own documents and a resumed run seeks instead of replaying.
One record holds one document's token ids (little-endian uint32, ending as `encode_document` ends it), so one
set of shards serves every `seq_len` and document-level mixing; packing happens when training reads them.
Flat token streams (`.bin`/`.npy` as in nanoGPT or Megatron) would need a separate document index and reader of
our own; Parquet cannot fetch one row without decoding its whole row group. Records are written with
`group_size:1`, so reading one document does not decompress its neighbours.

Layout of the output directory:

    manifest.json       written last, atomically: the corpus is complete when it exists
    progress.jsonl      a header line, then one line per finished shard or file (what a restart skips)
    shards/<source>/<file:05d>-<part:05d>.array_record

Each source file is tokenized in document order into shards of about `shard_tokens` tokens (a shard closes
at the first document end at or past `shard_tokens`; documents are never split, so a file's last shard is
smaller). The files are split into `workers` contiguous ranges of about equal bytes, one process each. A shard
is written under a temporary name, renamed when complete, then logged; a restarted run continues each file
after its last logged shard, so a shard that was being written when the run died is written again.

`manifest.json`: {"format", "tokenizer": {"name", "fingerprint", "vocab_size"}, "shard_tokens",
"sources": {name: {"type", "path", "text_key", "files", "documents", "tokens",
"shards": [{"path" (relative to the manifest), "file", "part", "documents", "tokens", "sha256"}]}}}.

Reading (`TokenizedSource`) checks the manifest's tokenizer fingerprint against the training tokenizer and
every shard's sha256 before the first step, so a corrupt shard or a corpus made with another tokenizer is
refused up front. That check reads every shard once per host at start-up (in 8 threads): cheap for
billions of tokens, a real cost for a multi-terabyte corpus.

The output directory and the sources may be local or in a bucket (gs://...): every file goes through
`phi4_jax.paths`. ArrayRecord itself reads and writes local files only, so a shard is written to a local
staging file and uploaded whole, and training from a manifest in a bucket downloads each shard once into a
local cache named by its checksum (`verified_local_shards`); on a pod, a gcsfuse mount of the bucket (as
MaxText uses for ArrayRecord) gives a local manifest path and avoids the copy.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import queue as queue_lib
import shutil
import tempfile
import time
import types

import numpy as np

from phi4_jax import paths
from phi4_jax.data.sources import DataError, _files, open_source

FORMAT = "phi4_jax.tokenized/1"
FILE_TYPES = ("jsonl", "text", "parquet", "npy")   # source types that can be pre-tokenized
RECORD_DTYPE = np.dtype("<u4")
WRITER_OPTIONS = "group_size:1"
MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"


@dataclasses.dataclass(frozen=True)
class CorpusSource:
    """One source to pre-tokenize: `type` in FILE_TYPES, `path` a file or glob (as in `[[data.sources]]`)."""
    name: str
    type: str
    path: str
    text_key: str = "text"


# ----------------------------------------------------------------------------- storage

def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if paths.is_url(path) else os.path.dirname(os.path.abspath(path))


def _size(path: str) -> int:
    try:
        return max(int(paths.Path(path).stat().st_size), 1)
    except (OSError, AttributeError, NotImplementedError):
        return 1


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with paths.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _publish(staged: str, dest: str) -> None:
    """Moves a finished local file to `dest` whole: a rename on disk, one upload to a bucket."""
    if paths.is_url(dest):
        with open(staged, "rb") as f:
            paths.write_atomic(dest, f.read())
        os.remove(staged)
    else:
        os.replace(staged, dest)


# ----------------------------------------------------------------------------- writing

def _shard_name(source: str, file_index: int, part: int) -> str:
    return f"shards/{source}/{file_index:05d}-{part:05d}.array_record"


def _tokenize_file(task: dict, tokenizer, shard_tokens: int, out: str, queue) -> None:
    """Tokenizes one file from `task["start_doc"]`, sending ("shard", info) per closed shard, ("progress",
    tokens, docs) every quarter second, and ("file", info) at the end."""
    from array_record.python.array_record_module import ArrayRecordWriter

    cfg = types.SimpleNamespace(type=task["type"], path=task["path"], text_key=task["text_key"], generator=None)
    src = open_source(cfg, tokenizer.vocab_size, seed=0)
    part = task["start_part"]
    writer, shard, staged = None, None, None
    staging_dir = tempfile.mkdtemp(prefix="phi4_jax-shard-") if paths.is_url(out) else None
    pending_tokens = pending_docs = 0
    last_report = time.monotonic()

    def close_shard():
        writer.close()
        shard["sha256"] = file_sha256(staged)
        _publish(staged, paths.join(out, shard["path"]))
        queue.put(("shard", shard))

    try:
        documents = (src.iter_documents(task["start_doc"]) if hasattr(src, "iter_documents")
                     else (src[d] for d in range(task["start_doc"], len(src))))
        for doc, element in enumerate(documents, task["start_doc"]):
            if writer is None:
                shard = {"source": task["name"], "file": task["file_index"], "part": part,
                         "path": _shard_name(task["name"], task["file_index"], part),
                         "first_document": doc, "documents": 0, "tokens": 0}
                if staging_dir:   # ArrayRecord writes local files: stage there, then upload
                    staged = os.path.join(staging_dir, os.path.basename(shard["path"]))
                else:             # beside the shard, renamed when complete
                    staged = paths.join(out, shard["path"]) + ".tmp"
                    paths.makedirs(_parent(staged))
                writer = ArrayRecordWriter(staged, WRITER_OPTIONS)
            ids = element["tokens"] if "tokens" in element else tokenizer.encode_document(element["text"])
            writer.write(np.asarray(ids, RECORD_DTYPE).tobytes())
            shard["documents"] += 1
            shard["tokens"] += len(ids)
            pending_tokens += len(ids)
            pending_docs += 1
            if shard["tokens"] >= shard_tokens:
                close_shard()
                writer, part = None, part + 1
            if time.monotonic() - last_report > 0.25:
                parent = multiprocessing.parent_process()
                if parent is not None and not parent.is_alive():   # the run was killed: stop too
                    raise SystemExit(1)
                queue.put(("progress", pending_tokens, pending_docs))
                pending_tokens = pending_docs = 0
                last_report = time.monotonic()
        if writer is not None:
            close_shard()
    finally:
        if staging_dir:
            shutil.rmtree(staging_dir, ignore_errors=True)
    queue.put(("progress", pending_tokens, pending_docs))
    queue.put(("file", {"source": task["name"], "file": task["file_index"], "documents": len(src)}))


def _worker(worker_id: int, tasks: list[dict], shard_tokens: int, out: str, queue) -> None:
    """A tokenizing process: its files in order, then ("exit", worker_id, error message or None)."""
    try:
        from phi4_jax.data.tokenizing import Phi4TextTokenizer

        tokenizer = Phi4TextTokenizer()
        for task in tasks:
            try:
                _tokenize_file(task, tokenizer, shard_tokens, out, queue)
            except DataError as e:
                raise DataError(f"source {task['name']!r}, file {task['path']}: {e}") from None
        queue.put(("exit", worker_id, None))
    except BaseException as e:  # reported to the parent, which stops the run with this message
        queue.put(("exit", worker_id, str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"))


def _split_ranges(tasks: list[dict], n: int) -> list[list[dict]]:
    """`tasks` cut into at most `n` contiguous ranges of about equal file bytes."""
    sizes = np.array([_size(t["path"]) for t in tasks], float)
    middles = (np.cumsum(sizes) - sizes / 2) / sizes.sum()   # where each file's bytes are centred, in [0, 1)
    groups = [[] for _ in range(n)]
    for task, middle in zip(tasks, middles):
        groups[min(int(middle * n), n - 1)].append(task)
    return [g for g in groups if g]


def _read_progress(path: str, header: dict) -> list[dict]:
    """The finished-shard and finished-file entries of an earlier run with the same header; the log is
    rewritten without a line cut short by a kill."""
    lines = paths.read_text(path).splitlines()
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise DataError(f"{path} line {i + 1} is not valid JSON; delete the output directory "
                                "and start again") from None
    if not entries or entries[0].get("header") != header:
        raise DataError(f"{path} belongs to a run with other sources, tokenizer or shard size; use another "
                        "output directory, or delete it to start again")
    paths.write_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))
    return entries[1:]


def _manifest(header: dict, tokenizer, entries: list[dict]) -> dict:
    sources = {}
    for spec in header["sources"]:
        shards = sorted((e["shard"] for e in entries if "shard" in e and e["shard"]["source"] == spec["name"]),
                        key=lambda s: (s["file"], s["part"]))
        documents = sum(s["documents"] for s in shards)
        if documents == 0:
            raise DataError(f"source {spec['name']!r} ({spec['path']}) has no documents")
        sources[spec["name"]] = {
            "type": spec["type"], "path": spec["path"], "text_key": spec["text_key"], "files": spec["files"],
            "documents": documents, "tokens": sum(s["tokens"] for s in shards),
            "shards": [{k: s[k] for k in ("path", "file", "part", "documents", "tokens", "sha256")}
                       for s in shards]}
    return {"format": FORMAT, "tokenizer": {"name": "phi4", "fingerprint": tokenizer.fingerprint,
                                            "vocab_size": tokenizer.vocab_size},
            "shard_tokens": header["shard_tokens"], "sources": sources}


def tokenize_corpus(corpus: list[CorpusSource], out: str, *, shard_tokens: int = 1 << 24, workers: int = 1,
                    progress: bool = True, log=print) -> dict:
    """Tokenizes `corpus` with the phi-4 tokenizer into shards under `out` and returns the manifest (also
    written to OUT/manifest.json). Resumes an interrupted run with the same settings; a finished corpus is
    returned as it is. Raises DataError on bad input (nothing finished is removed)."""
    from phi4_jax.data.tokenizing import Phi4TextTokenizer

    if not corpus:
        raise DataError("no sources to tokenize")
    if not (isinstance(shard_tokens, int) and shard_tokens > 0):
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if not (isinstance(workers, int) and workers > 0):
        raise DataError(f"workers must be a positive integer, got {workers!r}")
    names = [s.name for s in corpus]
    if len(set(names)) != len(names):
        raise DataError(f"source names must be unique, got {names}")
    for s in corpus:
        if s.type not in FILE_TYPES:
            raise DataError(f"source {s.name!r}: type {s.type!r} cannot be pre-tokenized; use one of {FILE_TYPES}")
        if not s.name or "/" in s.name or s.name.startswith("."):
            raise DataError(f"source name {s.name!r} cannot name a directory")
    tokenizer = Phi4TextTokenizer()
    header = {"format": FORMAT, "tokenizer": tokenizer.fingerprint, "shard_tokens": shard_tokens,
              "sources": [{**dataclasses.asdict(s), "files": _files(s.path, f"source {s.name!r}")}
                          for s in corpus]}

    out = paths.normalize(out)
    manifest_path, progress_path = paths.join(out, MANIFEST), paths.join(out, PROGRESS)
    if paths.exists(manifest_path):
        manifest = json.loads(paths.read_text(manifest_path))
        done = {n: {"type": s["type"], "path": s["path"], "text_key": s["text_key"], "files": s["files"]}
                for n, s in manifest.get("sources", {}).items()}
        want = {s["name"]: {k: s[k] for k in ("type", "path", "text_key", "files")} for s in header["sources"]}
        if (done != want or manifest.get("shard_tokens") != shard_tokens
                or manifest.get("tokenizer", {}).get("fingerprint") != tokenizer.fingerprint):
            raise DataError(f"{out} already holds a different tokenized corpus; choose another output directory")
        log(f"{manifest_path} exists: the corpus is already tokenized")
        return manifest

    try:
        paths.check_writable_dir(out, "tokenize output")
    except paths.StorageError as e:
        raise DataError(str(e)) from None
    entries = _read_progress(progress_path, header) if paths.exists(progress_path) else []
    if not entries:
        paths.write_atomic(progress_path, json.dumps({"header": header}) + "\n")
    files_done = {(e["file"]["source"], e["file"]["file"]) for e in entries if "file" in e}
    last_shard = {}
    for e in entries:
        if "shard" in e:
            s = e["shard"]
            if not paths.exists(paths.join(out, s["path"])):
                raise DataError(f"{progress_path} lists shard {s['path']}, which is missing; delete the output "
                                "directory and start again")
            key = (s["source"], s["file"])
            if key not in last_shard or s["part"] > last_shard[key]["part"]:
                last_shard[key] = s
    tasks = []
    for spec in header["sources"]:
        for fi, path in enumerate(spec["files"]):
            key = (spec["name"], fi)
            if key in files_done:
                continue
            prev = last_shard.get(key)
            tasks.append({"name": spec["name"], "type": spec["type"], "text_key": spec["text_key"],
                          "path": path, "file_index": fi,
                          "start_doc": prev["first_document"] + prev["documents"] if prev else 0,
                          "start_part": prev["part"] + 1 if prev else 0})
    if entries:
        log(f"resuming: {sum('shard' in e for e in entries)} shards and {len(files_done)} files already done")

    if tasks:
        entries += _run_workers(tasks, workers, shard_tokens, out, progress_path, progress)
    manifest = _manifest(header, tokenizer, entries)
    paths.write_atomic(manifest_path, json.dumps(manifest, indent=1))
    return manifest


def _run_workers(tasks, workers, shard_tokens, out, progress_path, progress) -> list[dict]:
    """Runs the tasks on processes, logging finished shards and files; returns the new log entries."""
    ctx = multiprocessing.get_context("spawn")   # the parent may hold threads (JAX, grain): never fork it
    queue = ctx.Queue()
    groups = _split_ranges(tasks, workers)
    procs = [ctx.Process(target=_worker, args=(i, g, shard_tokens, out, queue), daemon=True)
             for i, g in enumerate(groups)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, dynamic_ncols=True)
    new_entries, running, error, documents = [], set(range(len(procs))), None, 0
    try:
        for p in procs:
            p.start()
        log_file = paths.AppendLog(progress_path)   # on a bucket, re-uploaded at most every 10 s
        try:
            while running:
                try:
                    msg = queue.get(timeout=1.0)
                except queue_lib.Empty:
                    dead = [i for i in running if not procs[i].is_alive()]
                    if dead and queue.empty():
                        error = f"tokenizing process {dead[0]} died (exit code {procs[dead[0]].exitcode})"
                        break
                    continue
                kind = msg[0]
                if kind == "progress":
                    documents += msg[2]
                    if bar is not None:
                        bar.update(msg[1])
                        bar.set_postfix(docs=documents, refresh=False)
                elif kind in ("shard", "file"):
                    entry = {kind: msg[1]}
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()   # a lost entry only means its shard is written again
                    new_entries.append(entry)
                elif kind == "exit":
                    running.discard(msg[1])
                    if msg[2] is not None:
                        error = msg[2]
                        break
        finally:
            log_file.close()
    finally:
        if bar is not None:
            bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
    if error:
        raise DataError(f"{error} (finished shards are kept; run the same command again to resume)")
    return new_entries


# ----------------------------------------------------------------------------- reading

def load_manifest(path: str) -> dict:
    if not paths.exists(path):
        raise DataError(f"tokenized manifest {path!r} does not exist (run python -m phi4_jax.data.tokenize)")
    try:
        manifest = json.loads(paths.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"tokenized manifest {path!r} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path!r} is not a {FORMAT} manifest")
    return manifest


def shard_cache_dir() -> str:
    """Where shards read from a bucket are kept: $PHI4_JAX_SHARD_CACHE, else ~/.cache/phi4_jax/shards."""
    return os.environ.get("PHI4_JAX_SHARD_CACHE") or os.path.expanduser("~/.cache/phi4_jax/shards")


def verified_local_shards(root: str, shards: list[dict], what: str) -> list[str]:
    """Local paths of the shards under `root`, each checked against its recorded sha256 (in threads).

    On disk the shards are read where they are. In a bucket (ArrayRecord reads local files only) each is
    downloaded once into `shard_cache_dir()`, named by its checksum, and checked before it is stored, so the
    cache never holds a bad copy. DataError names the first missing or corrupt shard."""
    remote = paths.is_url(root)
    cache = shard_cache_dir()

    def fetch(shard):
        source = paths.join(root, shard["path"])
        local = os.path.join(cache, shard["sha256"] + ".array_record") if remote else source
        if remote and os.path.exists(local) and file_sha256(local) == shard["sha256"]:
            return local   # downloaded before
        if not paths.exists(source):
            raise DataError(f"{what}: shard {source} is missing")
        data = paths.read_bytes(source) if remote else None
        digest = hashlib.sha256(data).hexdigest() if remote else file_sha256(source)
        if digest != shard["sha256"]:
            raise DataError(f"{what}: shard {source} has sha256 {digest[:16]}..., the manifest says "
                            f"{shard['sha256'][:16]}... (corrupt or replaced; tokenize again)")
        if remote:
            paths.write_atomic(local, data)
        return local

    from tqdm.auto import tqdm

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(shards) or 1)) as pool:
        return list(tqdm(pool.map(fetch, shards), total=len(shards), desc=f"verify {what}", unit="shard",
                         leave=False, disable=None))   # disable=None: no bar unless stderr is a terminal


class TokenizedSource:
    """Random access over the documents of one source of a pre-tokenized corpus: {"tokens": int32 [n]}.

    Refuses a manifest made with another tokenizer (`tokenizer_fingerprint`) and shards whose checksum does
    not match (`verified_local_shards`; a manifest in a bucket has its shards cached locally). `mean_document_tokens` comes from the manifest (for token-weighted mixing)."""

    def __init__(self, manifest_path: str, name: str, *, tokenizer_fingerprint: str):
        import grain

        manifest = load_manifest(manifest_path)
        made_with = manifest.get("tokenizer", {}).get("fingerprint")
        if made_with != tokenizer_fingerprint:
            raise DataError(f"tokenized manifest {manifest_path!r} was made with another tokenizer (fingerprint "
                            f"{str(made_with)[:16]}..., this run's tokenizer is {tokenizer_fingerprint[:16]}...)")
        sources = manifest.get("sources", {})
        if name not in sources:
            raise DataError(f"tokenized manifest {manifest_path!r} has no source {name!r}; it has {sorted(sources)}")
        entry = sources[name]
        if not entry.get("documents") or not entry.get("shards"):
            raise DataError(f"tokenized source {name!r} in {manifest_path!r} has no documents")
        local = verified_local_shards(_parent(manifest_path), entry["shards"], f"tokenized source {name!r}")
        self.source = grain.sources.ArrayRecordDataSource(local)
        if len(self.source) != entry["documents"]:
            raise DataError(f"tokenized source {name!r}: the shards hold {len(self.source)} documents, the "
                            f"manifest says {entry['documents']}")
        self.documents, self.tokens = entry["documents"], entry["tokens"]
        self.mean_document_tokens = self.tokens / self.documents

    def __len__(self):
        return self.documents

    def __getitem__(self, i):
        return {"tokens": np.frombuffer(self.source[i], RECORD_DTYPE).astype(np.int32)}
