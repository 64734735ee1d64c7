"""Training metrics: where each step's time goes, goodput, and the writers (metrics.jsonl and TensorBoard).

`StepClock` splits the wall time between two steps' reports into waiting for data, checkpointing (the
blocking part of a save), compilation (the first step's dispatch, which traces and compiles) and compute (the
rest: the device step and the host work around it). Goodput, as MaxText reports it, is productive step time
over wall time: the summed compute seconds over the seconds since the run's process started training (set-up,
restoring, compilation, data waits and checkpoint saves are all badput).

`MetricsWriter` writes one JSON object per logged step to WORKDIR/metrics.jsonl and the same scalars to a
TensorBoard event file beside it (`tensorboard --logdir WORKDIR`), both through `phi4_jax.paths`, so a gs://
workdir gets them too. The event files are written by tensorboardX (protobuf only: no TensorFlow; clu's
writers need TensorFlow or PyTorch for TensorBoard output); object-store URLs are routed through the path
layer's `AppendLog` by registering a tensorboardX writer factory. On a bucket both files are uploaded whole at
most every `flush_every_s` seconds, and always when a checkpoint is saved and at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid

from phi4_jax import paths

METRICS_FILE = "metrics.jsonl"
# The split of a step's `seconds` (they add up to it).
TIME_SPLIT = ("data_seconds", "compile_seconds", "checkpoint_seconds", "compute_seconds")


class StepClock:
    """The time split of each step and the run's goodput.

    Create it when the run starts (its set-up counts as wall time); `start_steps()` right before the first
    step; `timed(kind)` around waits of kind "data", "checkpoint" or "compile"; `step_done()` when a step's
    metrics arrive: it returns that step's split and the running totals.
    """

    def __init__(self):
        self.started = time.perf_counter()
        self._mark = self.started
        self._waits = {"data": 0.0, "compile": 0.0, "checkpoint": 0.0}
        self.productive = 0.0

    def start_steps(self) -> None:
        self._mark = time.perf_counter()
        self._waits = dict.fromkeys(self._waits, 0.0)

    @contextlib.contextmanager
    def timed(self, kind: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._waits[kind] += time.perf_counter() - t0

    def step_done(self) -> dict:
        """{seconds, data_seconds, compile_seconds, checkpoint_seconds, compute_seconds, productive_seconds,
        elapsed_seconds, goodput} for the step whose metrics just arrived (its seconds run from the previous
        step's report); productive and elapsed seconds are totals since the run started."""
        now = time.perf_counter()
        seconds = now - self._mark
        split = {f"{kind}_seconds": s for kind, s in self._waits.items()}
        split["compute_seconds"] = seconds - sum(self._waits.values())
        self.productive += split["compute_seconds"]
        elapsed = now - self.started
        self._mark, self._waits = now, dict.fromkeys(self._waits, 0.0)
        return {"seconds": seconds, **split, "productive_seconds": self.productive, "elapsed_seconds": elapsed,
                "goodput": self.productive / elapsed}


class _AppendLogFactory:
    """tensorboardX's writer-factory interface over `paths.AppendLog`, for object-store URLs. tensorboardX
    flushes every `flush_secs` (and on close); each flush uploads the event file whole."""

    def open(self, path):
        return paths.AppendLog(path, truncate=True, min_interval_s=0.0)

    def directory_check(self, path):
        paths.makedirs(path)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a local path or URL)."""
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def _records_up_to(path: str, step: int) -> tuple[list[str], bool]:
    """The lines of an existing metrics.jsonl whose step is at most `step`, and whether any were dropped
    (records of steps a killed run logged after its last checkpoint, and a torn last line)."""
    if not paths.exists(path):
        return [], False
    lines = [line for line in paths.read_text(path).splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    return kept, len(kept) != len(lines)


class MetricsWriter:
    """metrics.jsonl and TensorBoard events for one run in `workdir`.

    `start_step`: the step the run starts from (0, or the checkpoint it resumed from): records of later steps
    already in metrics.jsonl (logged by a run killed before it could save them) are dropped, and TensorBoard
    is told to purge its events from `start_step + 1` on, so the resumed run's records replace them.
    `write(record)` needs `step`; every other numeric value becomes a TensorBoard scalar of the same name.
    """

    def __init__(self, workdir: str, *, start_step: int, flush_every_s: float = 30.0, tensorboard: bool = True):
        self.path = paths.join(workdir, METRICS_FILE)
        kept, dropped = _records_up_to(self.path, start_step)
        if dropped:
            paths.write_atomic(self.path, "".join(line + "\n" for line in kept))
        self._jsonl = paths.AppendLog(self.path, min_interval_s=flush_every_s)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter, record_writer

            for scheme in ("gs", "s3"):
                record_writer.register_writer_factory(scheme, _AppendLogFactory())
            self._tb = SummaryWriter(workdir, purge_step=start_step + 1 if start_step else None,
                                     flush_secs=max(int(flush_every_s), 1),
                                     filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:6]}")

    def write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=record["step"])

    def flush(self) -> None:
        """Makes everything written so far durable (uploads it, on a bucket)."""
        self._jsonl.flush(force=True)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
