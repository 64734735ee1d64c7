"""A real GCS JSON API server on 127.0.0.1 for tests (`gcp-storage-emulator`, in-memory), and the environment
that points gcsfs (`STORAGE_EMULATOR_HOST`) and TensorStore (`TENSORSTORE_GCS_HTTP_URL`, with
`GOOGLE_AUTH_TOKEN_FOR_TESTING` so it does not look for credentials) at it.

One gap in the emulator is filled here (`_serve_generation_headers`): real GCS answers a media download with the
object's generation in `x-goog-generation` (and `x-goog-metageneration`); gcp-storage-emulator 2026.7.19 sends
neither, and TensorStore, which reads the generation from that header to make its conditional writes (OCDBT's
manifest: read, then write if the generation still matches), fails with "Malformed StorageGeneration". The
emulator also ignores `ifGenerationMatch`, which is harmless here: each process writes its own OCDBT database.

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


def _serve_generation_headers() -> None:
    """Makes the emulator's media downloads carry x-goog-generation / x-goog-metageneration, as GCS's do."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    if getattr(original, "with_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    download.with_generation = True
    objects.download = download   # `objects.get` (?alt=media) looks it up here; the routes hold it directly:
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            if handler is original:
                methods[method] = download


def start() -> Emulator:
    from gcp_storage_emulator.server import create_server

    _serve_generation_headers()
    for name in ("gcp_storage_emulator", "gcsfs"):   # a 404 per missing object, gcsfs's bucket-type probe
        logging.getLogger(name).setLevel(logging.CRITICAL)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    emulator = Emulator(f"http://127.0.0.1:{port}", server)
    os.environ.update(emulator.env)
    return emulator
