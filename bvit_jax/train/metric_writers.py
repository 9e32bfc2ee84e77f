"""Where the trainer's numbers go: JSON lines, TensorBoard (without TensorFlow), a progress bar.

``workdir/metrics.jsonl`` gets one JSON object per log step, e.g.
``{"step": 100, "split": "train", "loss": 1.2, "lr": 0.001, ...}``; TensorBoard
event files go to ``workdir/tensorboard`` through tensorboardX. Only process
0 writes. When a run resumes from step ``s``, lines after ``s`` (written by an
attempt that died before its next checkpoint) are dropped so the file reads
as one uninterrupted run. The workdir may be a local folder or a ``gs://``
URL (:mod:`bvit_jax.runs.storage`); ``metrics.jsonl`` is replaced atomically at
every write (a preemption mid-write leaves the previous version whole, and a
bucket has no append), event files in a bucket are uploaded at each flush.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

import numpy as np

from bvit_jax.runs import storage

__all__ = ["MetricWriter", "read_metrics"]

log = logging.getLogger(__name__)


def _plain(v: Any):
    v = np.asarray(v).item() if hasattr(v, "shape") or isinstance(v, np.generic) else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    return v


def _tensorboardx_writer():
    """tensorboardX's ``SummaryWriter``, imported without PyTorch.

    tensorboardX's writer module tries ``import torch`` at import time, only to
    accept torch tensors as values; where torch is installed (the timm import's
    extra) that costs seconds at every start-up. The writer here logs Python
    floats, so while tensorboardX loads, ``torch`` is marked absent
    (``sys.modules["torch"] = None`` makes ``import torch`` raise ImportError,
    which tensorboardX handles); a torch that is already imported is left alone.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    import tensorboardX

    return tensorboardX.SummaryWriter


class MetricWriter:
    """JSON-lines + TensorBoard + tqdm writer; a no-op on processes other than 0."""

    def __init__(
        self,
        workdir: storage.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        active: bool = True,
        progress_bar: bool | None = None,
    ):
        self.active = active
        self.path = storage.as_path(workdir) / "metrics.jsonl"
        self._tb = self._bar = None
        self._lines: list[str] = []
        if not active:
            return
        if self.path.exists():  # keep only what the restored checkpoint covers
            self._lines = [l for l in _rows_text(self.path) if json.loads(l).get("step", 0) <= start_step]
        storage.atomic_write_text(self.path, "".join(l + "\n" for l in self._lines))
        SummaryWriter = _tensorboardx_writer()
        storage.register_tensorboard_writer()
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=start_step + 1)
        if progress_bar is None:
            progress_bar = sys.stderr.isatty()
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), "split": split, **{k: _plain(v) for k, v in scalars.items()}}
        self._lines.append(json.dumps(row))
        storage.atomic_write_text(self.path, "".join(l + "\n" for l in self._lines))
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._bar is not None and split == "train":
            postfix = {"loss": f"{row.get('loss', float('nan')):.4f}"}
            if "data_wait_s" in row:  # an input-bound run shows here first
                postfix["data_wait"] = f"{row['data_wait_s'] * 1e3:.0f}ms"
            self._bar.set_postfix(postfix)
        elif split == "train":  # no terminal: the progress line goes to the log
            log.info(
                "step %d: loss %.4f, %.0f img/s, step %.1f ms, data wait %.1f ms",
                step,
                row.get("loss", float("nan")),
                row.get("img_per_s", float("nan")),
                row.get("step_time_s", float("nan")) * 1e3,
                row.get("data_wait_s", float("nan")) * 1e3,
            )

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def read_metrics(workdir: storage.PathLike, split: str | None = None) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` (optionally one split), in order."""
    rows = [json.loads(l) for l in _rows_text(storage.as_path(workdir) / "metrics.jsonl")]
    return [r for r in rows if split is None or r.get("split") == split]


def _rows_text(path) -> list[str]:
    """The non-empty lines of a metrics file."""
    return [l for l in path.read_text().splitlines() if l.strip()]
