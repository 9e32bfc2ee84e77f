"""How fast the train step runs: step time around the steps alone, images per second, MFU.

:class:`StepTimer` splits the loop's wall time into the steps (and within
them the wait for input) and everything else (the first step, which
compiles; evaluation; diagnostics; checkpoints; profiling), so ``img_per_s``,
``step_time_s`` and the ETA describe training, not the pauses around it.

Model FLOPs utilisation (MFU; Chowdhery et al. 2022, "PaLM", Appendix B) is
the model's training FLOPs per second over the devices' peak::

    MFU = (6 * M_student + 2 * M_teacher) * images_per_s / (num_devices * peak_flops)

with ``M`` the multiply-accumulates of one image's forward pass
(:func:`bvit_jax.nn.summary.summary` ``.macs``, binary MACs included: the train
step runs them as floating-point matmuls on ±1 values), ``2 M`` FLOPs for a
forward and ``4 M`` for its backward (gradients of activations and of
weights), and the frozen teacher's forward alone. Peak FLOPs per device come
from the vendor's dense bfloat16 figure (:data:`PEAK_FLOPS`); an unknown device
(a CPU) has no MFU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax

from bvit_jax.runs import storage

__all__ = ["PEAK_FLOPS", "peak_flops", "train_flops_per_image", "StepTimer"]

# Dense bfloat16 peak FLOP/s per device (one chip or GPU), from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The dense bfloat16 peak of a device named ``device_kind`` (``jax.devices()[0].device_kind``), or None.

    Matched by the longest entry of :data:`PEAK_FLOPS` the name starts with
    ("NVIDIA H100 80GB HBM3" -> "NVIDIA H100").
    """
    matches = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def train_flops_per_image(student_macs: int, teacher_macs: int = 0) -> float:
    """``6 M_student + 2 M_teacher``: training FLOPs of one image (forward + backward, frozen teacher forward)."""
    return 6.0 * student_macs + 2.0 * teacher_macs


class StepTimer:
    """Wall time of the train steps since the last :meth:`report`, other work excluded.

    The loop takes each batch through :meth:`next_batch` (which times the
    wait for input and counts a step), wraps non-step work in ``with
    timer.excluded():``, calls :meth:`restart` after the first step (it
    compiles) and :meth:`report` at each log step, after the step's metrics
    were fetched (which waits for the device): the mean step time and input
    wait of the steps since the previous report.
    """

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        """Start a new window now (nothing before counts)."""
        self._start = time.perf_counter()
        self._excluded = 0.0
        self._data_wait = 0.0
        self._steps = 0

    def next_batch(self, iterator: Iterator[Any]) -> Any:
        """``next(iterator)``, its wall time counted as input wait of one more step."""
        t0 = time.perf_counter()
        batch = next(iterator)
        self._data_wait += time.perf_counter() - t0
        self._steps += 1
        return batch

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """A ``with`` block whose wall time does not count as step time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t0

    def report(self) -> dict[str, float]:
        """``{'step_time_s', 'data_wait_s'}``: means per step of this window; then starts a new one."""
        steps = max(self._steps, 1)
        out = {
            "step_time_s": max(time.perf_counter() - self._start - self._excluded, 0.0) / steps,
            "data_wait_s": self._data_wait / steps,
        }
        self.restart()
        return out


class Profile:
    """A ``jax.profiler`` trace of ``config.profile_steps`` train steps from ``config.profile_first_step``.

    Written on process 0 (``active``) into ``workdir/profile/`` (TensorBoard's
    profile plugin and Perfetto read it): traced into a local temporary folder,
    then copied there, so a ``gs://`` workdir gets the same files. Steps count
    as the trainer does (step ``s`` is the update that makes the counter
    ``s + 1``); a run resumed past the first step traces from where it starts.
    ``profile_steps = 0`` (default) traces nothing.
    """

    def __init__(self, workdir: Any, config: Any, start_step: int, *, active: bool = True):
        self._count = int(config.get("profile_steps", 0) or 0) if active else 0
        self._first = max(int(config.get("profile_first_step", 0) or 0), int(start_step))
        self._dest = workdir / "profile"
        self._local: str | None = None

    def before_step(self, step: int) -> None:
        """Start the trace before step ``first``."""
        if self._count and self._local is None and step == self._first:
            self._local = tempfile.mkdtemp(prefix="bvit-profile-")
            jax.profiler.start_trace(self._local)

    def after_step(self, step: int, outputs: Any = None) -> None:
        """Stop after ``profile_steps`` steps (``step``: updates done), once ``outputs`` (the step's) are ready."""
        if self._local is not None and step >= self._first + self._count:
            self.close(outputs)

    def close(self, outputs: Any = None) -> None:
        """Stop a running trace (after ``outputs`` are computed) and copy its files into the workdir."""
        if self._local is None:
            return
        jax.block_until_ready(outputs)  # the traced steps have finished on the device
        jax.profiler.stop_trace()
        for root, _, files in os.walk(self._local):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, self._local)
                dst = storage.as_path(self._dest) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as f:
                    dst.write_bytes(f.read())
        shutil.rmtree(self._local, ignore_errors=True)
        self._local = None
        self._count = 0
