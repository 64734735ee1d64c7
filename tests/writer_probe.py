"""Records the TensorStore writes a `ParamArrayWriter` makes: `record_array_writes(monkeypatch)` returns a list
that fills with (array path, index) for every region any writer created from then on indexes (the writer indexes
its arrays only to write them), and `covers_whole_chunks(writer_info, path, index)` says whether such a write
covers whole chunks along the array's split axis."""

from __future__ import annotations


class _Recorded:
    """A writer's TensorStore array whose indexing (a write's region) is recorded."""

    def __init__(self, arr, path, writes):
        self.arr, self.path, self.writes = arr, path, writes

    def __getattr__(self, name):
        return getattr(self.arr, name)

    def __getitem__(self, index):
        self.writes.append((self.path, tuple(index) if isinstance(index, tuple) else (index,)))
        return self.arr[index]


def record_array_writes(monkeypatch) -> list:
    from phi4_jax.checkpoint import store

    writes, init = [], store.ParamArrayWriter.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._arrays = {path: _Recorded(arr, path, writes) for path, arr in self._arrays.items()}

    monkeypatch.setattr(store.ParamArrayWriter, "__init__", recording_init)
    return writes


def misaligned(shape, chunks, axis, index) -> bool:
    """Whether a region `index` of an array of `shape` cut into `chunks` along `axis` covers part of a chunk."""
    if axis >= len(shape) or axis >= len(index) or isinstance(index[axis], int):
        return False
    start, stop, _ = index[axis].indices(shape[axis])
    return start % chunks[axis] != 0 or (stop - start != chunks[axis] and stop != shape[axis])
