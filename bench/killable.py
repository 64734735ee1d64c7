"""One subprocess with a hard deadline, killed whole (its own process group) when the deadline passes.

Used by bench/gpu_suite.py (one stage per subprocess) and bench/attention_probe.py (one attention config per
subprocess): a hang in a compiler or a kernel loses only that subprocess, and its log shows how far it got.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def run_killable(cmd: list[str], *, timeout: float, log_path: str, cwd: str, env: dict) -> dict:
    """Runs `cmd` with stdout and stderr into `log_path`; returns {"returncode", "status", "wall_s", "log"}.

    status is "ok" (exit 0), "failed" (another exit code) or "timeout" (killed after `timeout` seconds, its
    whole process group with SIGKILL; returncode None)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the process group this call started, nothing else
            proc.wait()
            rc, status = None, "timeout"
    with open(log_path, errors="replace") as f:
        text = f.read()
    return {"returncode": rc, "status": status, "wall_s": round(time.perf_counter() - t0, 1), "log": text}
