"""phi4_jax.checkpoint.store.atomic_directory: overwriting never leaves the destination missing, and what it
calls durable is fsynced.

Crashes are simulated by making `os.rename` fail (or a whole process dying: the rename that would undo the
first one fails too), then checking that the old checkpoint is still where it was and loads with the same
values as the Hugging Face model it was converted from (the peer: transformers' own state dict).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hf_models import make_tiny_phi3_dir
from writer_probe import misaligned, record_array_writes


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two different tiny HF models, and the first one converted (the 'old' checkpoint to protect)."""
    from phi4_jax.checkpoint.hf_convert import hf_to_checkpoint

    work = tmp_path_factory.mktemp("atomic")
    kw = dict(fmt="safetensors", hidden=32, heads=2, kv_heads=1, intermediate=48, vocab=64, layers=1)
    old_src, old_model = make_tiny_phi3_dir(work / "hf_old", seed=11, **kw)
    new_src, _ = make_tiny_phi3_dir(work / "hf_new", seed=12, **kw)
    old_ckpt = hf_to_checkpoint(old_src, work / "old_ckpt", progress=False)
    return work, old_src, old_model, new_src, old_ckpt


def _fresh_copy(work: Path, old_ckpt: Path, name: str) -> Path:
    import shutil
    dst = work / name
    shutil.copytree(old_ckpt, dst)
    return dst


def _assert_holds_old_model(ckpt: Path, old_model) -> None:
    """The checkpoint restores to exactly transformers' weights of the old model (spot-checked tensors)."""
    from phi4_jax.checkpoint.load import restore_params

    params = restore_params(ckpt)
    state = {k: v.detach().numpy() for k, v in old_model.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(params["embed"]), state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), state["lm_head.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["layers"]["down_proj"][0]),
                                  state["model.layers.0.mlp.down_proj.weight"].T)


def _leftovers(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f".{dst.name}.*"))


def _fail_rename_calls(monkeypatch, failing: set[int]) -> list:
    """Makes the n-th call of os.rename (1-based) raise for n in `failing`; returns the list of calls."""
    calls, real = [], os.rename

    def rename(src, dst, *args, **kwargs):
        calls.append((Path(src), Path(dst)))
        if len(calls) in failing:
            raise OSError(f"simulated crash at rename #{len(calls)}")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def test_failed_second_rename_keeps_the_old_checkpoint(sources, monkeypatch):
    from phi4_jax.checkpoint.hf_convert import hf_to_checkpoint

    work, _, old_model, new_src, old_ckpt = sources
    dst = _fresh_copy(work, old_ckpt, "dst_second_rename")
    calls = _fail_rename_calls(monkeypatch, {2})
    with pytest.raises(OSError, match="rename #2"):
        hf_to_checkpoint(new_src, dst, overwrite=True, progress=False)
    assert calls[0][0] == dst and calls[1][1] == dst and calls[2] == (calls[0][1], dst)  # moved aside, back
    monkeypatch.undo()
    _assert_holds_old_model(dst, old_model)
    assert _leftovers(dst) == []


def test_crash_between_renames_is_recovered_on_the_next_call(sources, monkeypatch):
    """A process that dies after moving the old checkpoint aside (here: the rename back fails too) leaves only
    the backup; the next atomic_directory call for that destination puts it back before doing anything."""
    from phi4_jax.checkpoint.hf_convert import hf_to_checkpoint
    from phi4_jax.checkpoint.store import atomic_directory

    work, _, old_model, new_src, old_ckpt = sources
    dst = _fresh_copy(work, old_ckpt, "dst_crash")
    _fail_rename_calls(monkeypatch, {2, 3})
    with pytest.raises(OSError, match="rename #3"):
        hf_to_checkpoint(new_src, dst, overwrite=True, progress=False)
    monkeypatch.undo()
    assert not dst.exists() and [p.name.split("-")[0] for p in _leftovers(dst)] == [".dst_crash.old"]

    with pytest.raises(RuntimeError, match="abandon"):
        with atomic_directory(dst, overwrite=True):
            _assert_holds_old_model(dst, old_model)  # restored before the new output is even started
            raise RuntimeError("abandon this write")
    _assert_holds_old_model(dst, old_model)
    assert _leftovers(dst) == []


def test_stale_backup_after_a_completed_swap_is_deleted(sources):
    from phi4_jax.checkpoint.store import atomic_directory

    work, _, _, _, old_ckpt = sources
    dst = _fresh_copy(work, old_ckpt, "dst_stale")
    stale = work / ".dst_stale.old-deadbeef"
    (stale / "params").mkdir(parents=True)
    with atomic_directory(work / "dst_stale_other") as tmp:  # another destination's backups are not touched
        (tmp / "x").write_text("x")
    assert stale.exists()
    with atomic_directory(dst, overwrite=True) as tmp:
        assert not stale.exists()
        (tmp / "x").write_text("new")
    assert (dst / "x").read_text() == "new" and _leftovers(dst) == []


def test_files_new_directory_and_parent_are_fsynced_in_order(tmp_path, monkeypatch):
    from phi4_jax.checkpoint.store import atomic_directory

    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", Path(src), Path(dst)))
        return real_rename(src, dst, *args, **kwargs)

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    with atomic_directory(dst, overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "data.bin").write_bytes(b"1234")
    monkeypatch.undo()
    assert (dst / "sub" / "data.bin").read_bytes() == b"1234" and not (dst / "old.txt").exists()

    def first(event):
        assert event in events, (event, events)
        return events.index(event)

    tmp = next(e[1] for e in events if e[0] == "rename" and e[2] == dst)
    moved_in = first(("rename", tmp, dst))
    assert first(("fsync", tmp / "sub" / "data.bin")) < first(("fsync", tmp / "sub")) < first(("fsync", tmp))
    assert first(("fsync", tmp)) < moved_in
    assert any(e == ("fsync", tmp_path) for e in events[moved_in:]), events  # the parent, after the renames


def test_load_model_reads_config_json_once(sources, monkeypatch):
    from phi4_jax import load_model
    from phi4_jax.checkpoint.load import restore_params

    _, _, old_model, _, old_ckpt = sources
    reads, real = [], Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "config.json":
            reads.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    model = load_model(old_ckpt)
    assert reads == [old_ckpt / "config.json"], reads
    np.testing.assert_array_equal(np.asarray(model.embed[...]),
                                  old_model.state_dict()["model.embed_tokens.weight"].numpy())
    reads.clear()
    restore_params(old_ckpt)
    assert len(reads) == 1, reads


def test_param_writer_buffers_pieces_into_whole_chunks(tmp_path, monkeypatch):
    """`ParamArrayWriter` given pieces that do not line up with its chunks (uneven blocks, the other axes as
    slice(None) or as explicit bounds, a stacked array's layers, rows written twice) writes only whole chunks;
    a chunk left incomplete is written at `finish()` with the rows it got (the rest stays the fill value). What
    the arrays hold is checked against NumPy."""
    import tensorstore as ts

    from phi4_jax.checkpoint import store

    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 10 * 8 * 4)     # 10 rows of 8 float32 values a chunk
    rng = np.random.default_rng(0)
    whole = rng.standard_normal((35, 8)).astype(np.float32)
    stacked = rng.standard_normal((2, 24, 8)).astype(np.float32)
    short = rng.standard_normal((20, 8)).astype(np.float32)
    specs = {("embed",): ((35, 8), np.float32), ("layers", "w"): ((2, 24, 8), np.float32),
             ("short",): ((20, 8), np.float32)}
    writes = record_array_writes(monkeypatch)
    writer = store.ParamArrayWriter(tmp_path / "params", specs)
    assert writer.chunks[("embed",)] == (9, 8) and writer.chunks[("layers", "w")] == (1, 8, 8)
    for a, b in [(0, 4), (4, 13), (13, 14), (14, 30), (30, 35)]:
        other = slice(None) if a % 2 else slice(0, 8)
        writer.write(("embed",), whole[a:b], (slice(a, b), other))
    writer.write(("embed",), np.zeros((3, 8), np.float32), (slice(2, 5),))   # overwritten below: the last write wins
    writer.write(("embed",), whole[0:9], (slice(0, 9),))
    for layer in range(2):
        for a, b in [(0, 7), (7, 15), (15, 24)]:
            writer.write(("layers", "w"), stacked[layer, a:b], (layer, slice(a, b)))
    writer.write(("short",), short[0:13], (slice(0, 13),))                  # rows 13-19 never arrive
    writer.finish()
    partial = [(path, index) for path, index in writes
               if misaligned(specs[path][0], writer.chunks[path], writer.split_axes[path], index)]
    assert partial == [(("short",), (slice(10, 13), slice(None)))]       # only the chunk left incomplete

    def read(name):
        return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "params" / name)}}
                       ).result().read().result()

    np.testing.assert_array_equal(read("embed"), whole)
    np.testing.assert_array_equal(read("layers.w"), stacked)
    want = short.copy()
    want[13:] = 0
    np.testing.assert_array_equal(read("short"), want)
