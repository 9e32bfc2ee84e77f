"""Where the trainer's numbers go: JSON lines, TensorBoard (without TensorFlow), a progress bar.

``workdir/metrics.jsonl`` gets one JSON object per log step, e.g.
``{"step": 100, "split": "train", "loss": 1.2, "lr": 0.001, ...}``; TensorBoard
event files go to ``workdir/tensorboard`` through tensorboardX. Only process
0 writes. When a run resumes from step ``s``, lines after ``s`` (written by an
attempt that died before its next checkpoint) are dropped so the file reads
as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MetricWriter", "read_metrics"]


def _plain(v: Any):
    v = np.asarray(v).item() if hasattr(v, "shape") or isinstance(v, np.generic) else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    return v


class MetricWriter:
    """JSON-lines + TensorBoard + tqdm writer; a no-op on processes other than 0."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        active: bool = True,
        progress_bar: bool | None = None,
    ):
        self.active = active
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = self._bar = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep only what the restored checkpoint covers
            lines = [l for l in self.path.read_text().splitlines() if l.strip()]
            kept = [l for l in lines if json.loads(l).get("step", 0) <= start_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=start_step + 1)
        if progress_bar is None:
            progress_bar = sys.stderr.isatty()
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), "split": split, **{k: _plain(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._bar is not None and split == "train":
            self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` (optionally one split), in order."""
    path = Path(workdir) / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r for r in rows if split is None or r.get("split") == split]
