"""The path layer (phi4_jax.paths) on local disk and against a GCS API emulator on 127.0.0.1."""

import os

import pytest

from phi4_jax import paths


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return f"gs://{request.getfixturevalue('gcs').bucket()}/run"


def test_write_glob_read_and_append(root):
    paths.write_atomic(paths.join(root, "a", "x1.jsonl"), '{"text": "one"}\n')
    paths.write_atomic(paths.join(root, "b", "x2.jsonl"), b'{"text": "two"}\n')
    paths.write_atomic(paths.join(root, "b", "y.txt"), "no")
    assert paths.glob(paths.join(root, "*", "x*.jsonl")) == [paths.join(root, "a", "x1.jsonl"),
                                                             paths.join(root, "b", "x2.jsonl")]
    assert paths.glob(paths.join(root, "nothing", "*.jsonl")) == []
    assert paths.read_text(paths.join(root, "a", "x1.jsonl")) == '{"text": "one"}\n'
    paths.write_atomic(paths.join(root, "a", "x1.jsonl"), "replaced")
    assert paths.read_text(paths.join(root, "a", "x1.jsonl")) == "replaced"

    log_path = paths.join(root, "m.jsonl")
    log = paths.AppendLog(log_path, min_interval_s=3600)
    log.write("1\n")
    log.flush(force=True)
    log.write("2\n")
    log.flush()   # within min_interval_s: a bucket object is not re-uploaded yet, a local file is flushed
    assert paths.read_text(log_path) == ("1\n2\n" if root.startswith("/") else "1\n")
    log.close()
    assert paths.read_text(log_path) == "1\n2\n"
    again = paths.AppendLog(log_path)   # reopening appends to what is there
    again.write("3\n")
    again.close()
    assert paths.read_text(log_path) == "1\n2\n3\n"
    assert [os.path.basename(p) for p in paths.glob(paths.join(root, "*"))] == ["a", "b", "m.jsonl"]


def test_unwritable_places_are_refused_without_writing(gcs, tmp_path):
    with pytest.raises(paths.StorageError, match=r"bucket gs://no-such-bucket-x does not exist"):
        paths.check_writable_dir("gs://no-such-bucket-x/run", "workdir")
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(paths.StorageError, match=r"workdir .*file/run cannot be written"):
        paths.check_writable_dir(str(blocker / "run"), "workdir")
    assert blocker.read_text() == "keep"
    bucket = gcs.bucket()
    assert paths.check_writable_dir(f"gs://{bucket}/run/") == f"gs://{bucket}/run"
    assert paths.glob(f"gs://{bucket}/run/*") == []   # the probe object is gone
