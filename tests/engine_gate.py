"""A gate on a started engine's step loop, so a test decides which requests share engine steps.

Tests that assert requests were batched together must not depend on how far the engine thread gets while client
threads start, connect and submit (on a loaded 2-core CI machine, that can be dozens of steps). With the gate
closed the engine thread waits before its next step; the test waits until the engine holds what it means to batch
(`wait_for`: a predicate on `engine.stats()`), then opens the gate:

    with StepGate(engine, monkeypatch) as gate:
        gate.start_together(client_threads, "the 8 requests")   # close, start, wait for the queue, open

or, step by step:

    with StepGate(engine, monkeypatch) as gate:
        gate.close(when=lambda stats: stats["tokens_generated"] > base)   # or close() now
        ... start a client thread; gate.wait_held(...); start others ...
        gate.wait_for(lambda stats: stats["queue_length"] == 4, "the 4 requests queued")
        gate.open()

Leaving the `with` block opens the gate (an assertion that failed in between does not leave the engine waiting),
and a gate held past `timeout` seconds opens by itself (`open()` then raises), so a test cannot hang the engine,
and the tests sharing it, on a wait that never comes true. `observe` records `engine.stats()` on the engine thread
before every step, which sampling from another thread could miss.
"""

from __future__ import annotations

import threading
import time

DEFAULT_TIMEOUT_S = 120.0


def wait_for_stats(engine, predicate, what: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Polls `engine.stats()` until `predicate(stats)` and returns those stats; fails naming `what` after `timeout`
    seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if predicate(stats):
            return stats
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}: {engine.stats()}")


class StepGate:
    def __init__(self, engine, monkeypatch, timeout: float = DEFAULT_TIMEOUT_S, observe=None):
        self.engine, self.timeout, self.observe = engine, timeout, observe
        self._step = engine._step
        self._open = threading.Event()
        self._open.set()
        self._close_when = None
        self.held = threading.Event()        # set while the engine thread waits at the gate
        self.timed_out = False
        monkeypatch.setattr(engine, "_step", self._gated_step)

    def __enter__(self) -> "StepGate":
        return self

    def __exit__(self, *exc) -> None:
        self._close_when = None
        self._open.set()

    def close(self, when=None) -> None:
        """Close now, or (`when`: a predicate on `engine.stats()`) before the first step at which it holds."""
        if when is None:
            self._open.clear()
        else:
            self._close_when = when

    def open(self) -> None:
        self._open.set()
        assert not self.timed_out, f"the engine waited at the gate for over {self.timeout:.0f} s"

    def start_together(self, threads, what: str) -> None:
        """Starts `threads` (each submits one request) with the gate closed, waits until the engine's queue holds
        one request per thread, then opens the gate: the engine plans its next step with all of them."""
        self.close()
        for t in threads:
            t.start()
        self.wait_for(lambda stats: stats["queue_length"] == len(threads), f"{what} to queue")
        self.open()

    def wait_held(self, what: str) -> dict:
        """Waits until the engine thread is at the gate; returns the engine's stats then."""
        assert self.held.wait(self.timeout), f"the engine never reached the gate ({what}): {self.engine.stats()}"
        return self.engine.stats()

    def wait_for(self, predicate, what: str) -> dict:
        """`wait_for_stats` with this gate's timeout."""
        return wait_for_stats(self.engine, predicate, what, self.timeout)

    def _gated_step(self):
        stats = self.engine.stats() if (self.observe is not None or self._close_when is not None) else None
        if self.observe is not None:
            self.observe(stats)
        if self._close_when is not None and self._close_when(stats):
            self._close_when = None
            self._open.clear()
        if not self._open.is_set():
            self.held.set()
            if not self._open.wait(self.timeout):
                self.timed_out = True
                self._open.set()
            self.held.clear()
        return self._step()
