"""Where a run's files live: a local folder or a cloud bucket, behind one path type.

A workdir (``--workdir``, ``config.distill.teacher_workdir``, ``bvit-export
--workdir``) is either a local path or a URL such as ``gs://bucket/run1``.
Both become an ``etils.epath.Path`` (:func:`as_path`), the path type orbax
itself takes: ``pathlib.Path`` would fold ``gs://`` into a local ``gs:/``
folder. Cloud URLs are served by ``gcsfs`` (fsspec) for small files and by
TensorStore's own GCS driver for orbax's arrays; both honour the usual
emulator variables (``STORAGE_EMULATOR_HOST``, ``TENSORSTORE_GCS_HTTP_URL``).

This module owns four rules of a run folder that several processes share:

* :func:`absolute`: a local path is made absolute (orbax requires it); a URL
  is already absolute and is left as written.
* :func:`atomic_write_text`: a small file (``config.json``,
  ``metrics.jsonl``) is replaced whole or not at all, so a preemption during
  the write leaves the previous version: locally a temporary file in the same
  folder and ``os.replace`` (POSIX ``rename(2)`` is atomic), in a bucket one
  object upload (GCS replaces an object atomically).
* :func:`check_shared`: on several processes every process must see the same
  folder (a bucket, or a shared file system); a local disk that only one host
  sees would scatter checkpoint shards over the hosts, so it stops the run at
  start-up with a :class:`bvit_jax.errors.ConfigError`.
* Listings are never cached: fsspec's GCS file system keeps each folder
  listing for the life of the process by default, so a process that listed
  ``checkpoints/`` (orbax's steps, another process's probe file, a teacher's
  run folder) would go on seeing that listing after another process, or a
  later run, wrote there. This module sets ``use_listings_cache=False`` in
  fsspec's configuration for ``gcs`` (unless the user set it).
* :func:`register_tensorboard_writer`: tensorboardX writes event files to
  cloud URLs through ``epath`` (its own GCS writer needs another client
  library and fails without it).
"""

from __future__ import annotations

import io
import os
import secrets
from typing import Any

from etils import epath

from bvit_jax.errors import ConfigError

__all__ = ["as_path", "is_url", "absolute", "atomic_write_text", "check_shared", "register_tensorboard_writer"]

PathLike = str | os.PathLike


def _fresh_listings() -> None:
    """Make fsspec's GCS file systems list folders afresh each time (see the module docstring)."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_fresh_listings()


def is_url(path: PathLike) -> bool:
    """Whether ``path`` names cloud storage (``scheme://...``, e.g. ``gs://bucket/run``)."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """``path`` (a local path or a ``gs://`` URL) as an ``etils.epath.Path``."""
    return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))


def absolute(path: PathLike) -> epath.Path:
    """The absolute form of ``path``: a local path resolved against the working directory, a URL as it is."""
    p = as_path(path)
    return p if is_url(p) else p.absolute()


def atomic_write_text(path: PathLike, text: str) -> epath.Path:
    """Replace the file ``path`` by ``text`` in one step: readers see the old or the new file, never a part.

    Local: write ``.<name>.tmp-<random>`` in the same folder, flush and fsync
    it, then ``os.replace`` it over ``path``. Cloud: one object upload (an
    object is replaced atomically). Creates the parent folder.
    """
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_url(p):
        p.write_text(text)
        return p
    tmp = p.parent / f".{p.name}.tmp-{secrets.token_hex(4)}"
    try:
        with open(os.fspath(tmp), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.fspath(tmp), os.fspath(p))
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def check_shared(workdir: PathLike) -> None:
    """Stop a multi-process run whose ``workdir`` is not one folder that every process sees.

    Process 0 writes a file with a random name into ``workdir``; every
    process then looks for it, and the answers are gathered. A process that
    does not see it (a local folder on another host, or a relative path
    resolved against another working directory) raises
    :class:`bvit_jax.errors.ConfigError` on every process, before anything is
    saved. A no-op on one process.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    probe = as_path(workdir) / f".shared-check-{token}"
    if jax.process_index() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token))
    multihost_utils.sync_global_devices("bvit_jax.runs.storage.check_shared:written")
    seen = np.asarray(multihost_utils.process_allgather(np.int32(probe.exists())))
    multihost_utils.sync_global_devices("bvit_jax.runs.storage.check_shared:read")
    if jax.process_index() == 0:
        probe.unlink()
    blind = [i for i, s in enumerate(seen.reshape(-1)) if not s]
    if blind:
        raise ConfigError(
            f"--workdir={os.fspath(workdir)} is not one folder that all {jax.process_count()} processes see: "
            f"process(es) {blind} cannot read what process 0 wrote there. A multi-process run needs a cloud "
            "bucket (e.g. --workdir=gs://BUCKET/RUN) or a file system mounted at the same absolute path on "
            "every host; checkpoint shards written to each host's own disk could never be restored."
        )


class _EpathRecordFile:
    """A write-only event file in cloud storage: the bytes so far, uploaded whole at each flush."""

    def __init__(self, path: str):
        self._path = as_path(path)
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        self._path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathWriterFactory:
    """tensorboardX's writer-factory protocol (``open``, ``directory_check``) over ``epath``."""

    def open(self, path: str) -> Any:
        return _EpathRecordFile(path)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard_writer(scheme: str = "gs") -> None:
    """Make tensorboardX write ``scheme://`` event files through ``epath`` (idempotent)."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _EpathWriterFactory())
