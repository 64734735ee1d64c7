"""A real GCS JSON API server on 127.0.0.1 for tests (`gcp-storage-emulator`, in-memory), and the environment
that points gcsfs (`STORAGE_EMULATOR_HOST`) and TensorStore (`TENSORSTORE_GCS_HTTP_URL`, with
`GOOGLE_AUTH_TOKEN_FOR_TESTING` so it does not look for credentials) at it.

Use the session-scoped `gcs` fixture (tests/conftest.py): one server per test process, because gcsfs and epath
cache their filesystem (and so the endpoint) per process. Give each test its own bucket (`gcs.bucket()`).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass


@dataclass
class Emulator:
    url: str
    server: object

    @property
    def env(self) -> dict[str, str]:
        """The variables a subprocess needs to use this emulator (already set in this process)."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}

    def bucket(self, prefix: str = "test") -> str:
        """Creates a new empty bucket and returns its name."""
        from gcp_storage_emulator.handlers.buckets import create_bucket

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        create_bucket(name, self.server._storage)
        return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> Emulator:
    from gcp_storage_emulator.server import create_server

    for name in ("gcp_storage_emulator", "gcsfs"):   # a 404 per missing object, gcsfs's bucket-type probe
        logging.getLogger(name).setLevel(logging.CRITICAL)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    emulator = Emulator(f"http://127.0.0.1:{port}", server)
    os.environ.update(emulator.env)
    return emulator
