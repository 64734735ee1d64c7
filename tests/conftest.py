"""Test-session setup: 8 simulated CPU devices (for sharding tests) and the project root on sys.path.

XLA_FLAGS must be set before JAX initializes its backends, so this runs before any test module imports jax.
Single-device tests are unaffected: they run on device 0.
"""

import os
import sys

_FLAGS = {"xla_force_host_platform_device_count": "8"}
# A collective (all-gather, psum) among the simulated devices waits for every device's thread; XLA aborts the
# process ("Termination timeout ... Exiting to ensure a consistent program state", i.e. "Fatal Python error:
# Aborted") when one thread arrives over ~60 s after the others (warn after 20 s, terminate 40 s later). A loaded
# 2-core CI machine can lag that much, so the limits are raised here, but not so far that a real deadlock (such as
# the callback interpreters' one, kernels/sharded.py) hangs the run for long: it still ends, with XLA's message
# naming the collective, within ~7 minutes (warn 120 s, terminate 300 s). Flags known to this jaxlib only (XLA
# dies on unknown ones).
try:
    from importlib.metadata import version as _version

    if _version("jaxlib").startswith(("0.10.", "0.11.")):
        _FLAGS.update(xla_cpu_collective_call_warn_stuck_timeout_seconds="120",
                      xla_cpu_collective_call_terminate_timeout_seconds="300")
except Exception:  # noqa: BLE001 - no jaxlib metadata: keep XLA's defaults
    pass
for _name, _value in _FLAGS.items():
    if _name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_name}={_value}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs():
    """A GCS API emulator on 127.0.0.1 for this test process (tests/gcs_emulator.py); `gcs.bucket()` makes a
    fresh bucket."""
    import gcs_emulator

    emulator = gcs_emulator.start()
    yield emulator
    emulator.server.stop()
