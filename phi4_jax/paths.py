"""One path layer for local files and cloud URLs (gs://, s3://, ...): workdirs, init_from, data file patterns.

Built on `etils.epath`, which with TensorFlow absent (and `EPATH_USE_TF=false`, set here, even if it is
installed) reaches buckets through fsspec (gcsfs for gs://). Why epath rather than fsspec directly: Orbax
already lists, creates and finalizes checkpoint directories through epath, so with epath the trainer's own
files (config.json, metrics.jsonl, TensorBoard events, plots) and the checkpoints go through the same client,
the same credentials and the same endpoint; TensorFlow's gfile (epath's other backend) is not wanted as a
dependency. Checkpoint arrays themselves are written by TensorStore's own gcs driver.

Authentication and endpoints are the clients' own: gcsfs uses Application Default Credentials (a TPU VM's
service account, or `gcloud auth application-default login`) and honours `STORAGE_EMULATOR_HOST`; TensorStore
uses the same credentials and honours `TENSORSTORE_GCS_HTTP_URL` (tests point both at a local emulator, with
`GOOGLE_AUTH_TOKEN_FOR_TESTING` so TensorStore does not look for a metadata server).

Object stores have no rename and no append, so:
- `write_atomic` writes a local file through a temporary file and `os.replace`, and a cloud object as one
  single-object upload (gcsfs finalizes the upload on close: the object appears whole or not at all);
- `AppendLog` appends to a local file, and on a bucket keeps the object's content in memory and re-uploads it
  whole on `flush` (at most every `min_interval_s`, always on `close`), each upload replacing the object whole.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
import uuid

os.environ.setdefault("EPATH_USE_TF", "false")  # before epath picks a backend: fsspec, never tf.io.gfile

from etils import epath  # noqa: E402

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_WILDCARD = re.compile(r"[*?\[]")


class StorageError(OSError):
    """A path that cannot be used: a bucket that does not exist, a directory that cannot be written, ..."""


def is_url(path) -> bool:
    """Whether `path` is a URL (gs://bucket/x, s3://...) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def normalize(path) -> str:
    """A canonical string for `path`: URLs unchanged (a trailing slash dropped), local paths absolute."""
    path = os.fspath(path)
    if is_url(path):
        return path.rstrip("/") if not path.endswith("://") else path
    return os.path.abspath(os.path.expanduser(path))


def Path(path) -> epath.Path:  # noqa: N802 - a constructor
    """An `epath.Path` for a local path or URL (the type Orbax takes)."""
    return epath.Path(normalize(path))


def join(base, *parts: str) -> str:
    """`base/part/...` for a local path or URL."""
    return str(Path(base).joinpath(*parts))


def exists(path) -> bool:
    return Path(path).exists()


def isdir(path) -> bool:
    return Path(path).is_dir()


def makedirs(path) -> None:
    """Creates a directory and its parents (a no-op for a bucket prefix that does not exist yet)."""
    Path(path).mkdir(parents=True, exist_ok=True)


def open(path, mode: str = "r"):  # noqa: A001 - the path layer's open
    """Opens a local file or cloud object (modes as for `open`; cloud objects: read or write whole)."""
    return Path(path).open(mode)


def read_text(path) -> str:
    return Path(path).read_text()


def read_bytes(path) -> bytes:
    return Path(path).read_bytes()


def glob(pattern: str) -> list[str]:
    """The sorted paths matching a glob pattern (`*`, `?`, `[...]` in any component) on disk or in a bucket.

    `**` is not supported on buckets (one listing per directory level would be needed)."""
    pattern = normalize(pattern)
    m = _WILDCARD.search(pattern)
    if m is None:
        return [pattern] if exists(pattern) else []
    cut = pattern.rfind("/", 0, m.start())
    base, rest = pattern[:cut] or "/", pattern[cut + 1:]
    if not exists(base):
        return []
    return sorted(str(p) for p in Path(base).glob(rest))


def write_atomic(path, data: str | bytes) -> None:
    """Writes `data` to `path` so that readers see the old content or the new, never a part.

    Local: a temporary file in the same directory, fsync, `os.replace`. Cloud: one single-object upload."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    path = normalize(path)
    if is_url(path):
        with open(path, "wb") as f:
            f.write(raw)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with io.open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AppendLog:
    """A file that grows by appending (metrics.jsonl, TensorBoard event files), on disk or in a bucket.

    `write(bytes)`, `flush(force=False)`, `close()`. On disk it is a file opened for appending (`flush` makes the
    written records durable). In a bucket the object's whole content is kept in memory (read once at
    construction unless `truncate`) and uploaded as one object by `flush`, at most once per `min_interval_s`
    unless `force` (`close` forces): an object store cannot append, and one upload replaces the object whole.
    `truncate=True` starts empty (an existing file or object is replaced at the first flush).
    Thread-safe (TensorBoard's writer flushes from a background thread).
    """

    def __init__(self, path, *, truncate: bool = False, min_interval_s: float = 10.0):
        self.path = normalize(path)
        self.remote = is_url(self.path)
        self.min_interval_s = float(min_interval_s)
        self._lock = threading.Lock()
        self._last_upload = -float("inf")
        self._dirty = False
        self._file = None
        if self.remote:
            self._buffer = bytearray()
            if not truncate and exists(self.path):
                self._buffer += read_bytes(self.path)
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = io.open(self.path, "wb" if truncate else "ab")

    def write(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        with self._lock:
            if self.remote:
                self._buffer += raw
            else:
                self._file.write(raw)
            self._dirty = True

    def flush(self, force: bool = False) -> None:
        with self._lock:
            if not self._dirty:
                return
            if not self.remote:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._dirty = False
                return
            now = time.monotonic()
            if not force and now - self._last_upload < self.min_interval_s:
                return
            write_atomic(self.path, bytes(self._buffer))
            self._last_upload, self._dirty = now, False

    def close(self) -> None:
        self.flush(force=True)
        if self._file is not None:
            self._file.close()
            self._file = None


def check_writable_dir(path, what: str = "directory") -> str:
    """Creates `path` if needed and proves it writable by writing and deleting a small probe object.

    Returns the normalized path; raises StorageError naming the path (and, for a bucket that does not exist,
    the bucket). Writes nothing else, so a failed check damages nothing."""
    path = normalize(path)
    probe = join(path, f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(path)
        write_atomic(probe, b"")
        Path(probe).unlink()
    except Exception as e:  # noqa: BLE001 - any failure means the directory cannot be used
        if is_url(path):
            scheme, rest = path.split("://", 1)
            bucket = f"{scheme}://{rest.split('/', 1)[0]}"
            try:
                bucket_exists = Path(bucket).exists()
            except Exception:  # noqa: BLE001
                bucket_exists = True   # cannot tell: report the write failure itself
            if not bucket_exists:
                raise StorageError(f"{what} {path}: bucket {bucket} does not exist (or is not visible to "
                                   "these credentials)") from None
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"{what} {path} cannot be written: {detail}") from None
    return path
