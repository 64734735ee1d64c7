"""One line describing the CPU machine a benchmark ran on (for BENCHMARKS.md entries)."""

from __future__ import annotations

import os
import platform


def describe_machine(with_load: bool = True) -> str:
    """CPU model, visible cores, RAM, OS release and (optionally) the current load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ""
    if with_load and hasattr(os, "getloadavg"):
        load = ", load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min)".format(*os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores visible, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}{load}"
