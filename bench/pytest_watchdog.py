"""pytest plugin for the GPU suite's kernel tests: a hard per-test timeout, a run order, exact deselection,
and every outcome written the moment it is known.

    python -m pytest -p bench.pytest_watchdog --watchdog-log R.jsonl --watchdog-timeout 60 \
        --watchdog-first tests/test_x.py::test_a --watchdog-deselect tests/test_x.py::test_b tests/...

- `--watchdog-timeout S`: each test runs under `faulthandler.dump_traceback_later(S, exit=True)`, a C-level
  watchdog that prints every thread's stack and ends the process even while a compiler or kernel holds the
  GIL. The caller (bench/gpu_suite.py) then sees a "start" with no "end" for that test, records it as
  timed out, and starts pytest again without it and without the tests already done. faulthandler has one such
  timer, so pytest's own `faulthandler_timeout` must be 0 (`-o faulthandler_timeout=0`; refused otherwise).
- `--watchdog-first ID` (repeatable): tests whose node id is ID, or starts with "ID[" (its parameter cases),
  run first, in the order given; the rest keep pytest's order. ID may also begin with the test file's
  absolute path instead of the path in the node id.
- `--watchdog-deselect ID` (repeatable): the test with node id ID, or all parameter cases of test ID, are
  deselected (exact match, unlike pytest's prefix-matching --deselect; ID as for --watchdog-first).
- `--watchdog-log PATH`: one JSON line per event, flushed at once: {"event": "start", "nodeid"} before a
  test, {"event": "end", "nodeid", "outcome", "time_s", "message"} after it (outcome passed, failed,
  error or skipped).
"""

from __future__ import annotations

import faulthandler
import json
import sys
import time

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("watchdog")
    group.addoption("--watchdog-timeout", type=float, default=None, help="seconds per test, then exit")
    group.addoption("--watchdog-log", default=None, help="JSON-lines file of test starts and outcomes")
    group.addoption("--watchdog-first", action="append", default=[], help="node id to run first (repeatable)")
    group.addoption("--watchdog-deselect", action="append", default=[], help="node id to deselect (repeatable)")


def _matches(item, test_id: str) -> bool:
    """Whether `test_id` names this item: its node id, or its file's absolute path + "::" + the rest of the
    node id (so that test files outside the rootdir can be named too), or either without the "[case]"."""
    names = {item.nodeid, f"{item.path}::{item.nodeid.split('::', 1)[-1]}"}
    return any(n == test_id or n.startswith(test_id + "[") for n in names)


def pytest_collection_modifyitems(session, config, items):
    drop = config.getoption("watchdog_deselect")
    if drop:
        deselected = [it for it in items if any(_matches(it, d) for d in drop)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [it for it in items if it not in deselected]
    first = config.getoption("watchdog_first")

    def rank(item):
        return next((i for i, f in enumerate(first) if _matches(item, f)), len(first))
    items.sort(key=rank)   # stable: the rest keep their order


class _Log:
    def __init__(self, path):
        self.file = open(path, "w") if path else None
        self.reports: dict[str, list] = {}

    def write(self, **record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


_LOG: _Log | None = None


def pytest_configure(config):
    global _LOG
    if config.getoption("watchdog_timeout") and float(config.getini("faulthandler_timeout") or 0) > 0:
        # faulthandler has one timer: pytest's faulthandler plugin (set up inside this plugin's wrapper) would
        # replace the watchdog's exit=True timer with its own, and a hanging test would never be ended.
        raise pytest.UsageError("--watchdog-timeout needs pytest's faulthandler_timeout off: add "
                                "-o faulthandler_timeout=0 (the project's pyproject.toml sets it)")
    _LOG = config._watchdog = _Log(config.getoption("watchdog_log"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    log = item.config._watchdog
    timeout = item.config.getoption("watchdog_timeout")
    log.write(event="start", nodeid=item.nodeid)
    t0 = time.perf_counter()
    if timeout:
        sys.stderr.write(f"\n[watchdog] {item.nodeid}: {timeout:.0f} s\n")
        faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        yield
    finally:
        if timeout:
            faulthandler.cancel_dump_traceback_later()
    reports = log.reports.pop(item.nodeid, [])
    outcome, message = "passed", ""
    for r in reports:
        if r.failed:
            outcome = "failed" if r.when == "call" else "error"
            message = str(r.longrepr)[-600:]
            break
        if r.skipped:
            outcome = "skipped"
            message = str(r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr)[-300:]
    log.write(event="end", nodeid=item.nodeid, outcome=outcome, time_s=round(time.perf_counter() - t0, 2),
              message=message)


def pytest_runtest_logreport(report):
    if _LOG is not None:
        _LOG.reports.setdefault(report.nodeid, []).append(report)
