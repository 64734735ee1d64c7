"""Test-session setup: 8 simulated CPU devices (for sharding tests) and the project root on sys.path.

XLA_FLAGS must be set before JAX initializes its backends, so this runs before any test module imports jax.
Single-device tests are unaffected: they run on device 0.
"""

import os
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
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
