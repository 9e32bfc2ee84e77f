"""Preemption: when to stop for a notice (SIGTERM), agreed on by every process.

Cloud schedulers announce preemption with SIGTERM and kill the VM after a
grace period. The trainer then saves once and exits 0, and a rerun resumes.

* One process: a Python SIGTERM handler sets a flag; the loop stops after
  the step during which it was set.
* Several processes: the notice may reach one host, some, or all, at
  different steps, and a checkpoint save is collective, so every process must
  stop at the same step. ``jax.distributed.initialize`` starts JAX's
  preemption sync service, which catches SIGTERM itself, tells the other
  processes, and picks the sync step ``max(step reached by any process) + 1``;
  :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
  returns True on every process at exactly that step. It must be asked at
  every step, which :meth:`PreemptionWatch.reached` does.
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

__all__ = ["PreemptionWatch"]

log = logging.getLogger(__name__)


class PreemptionWatch:
    """``reached(step)`` is True at the step where all processes stop for a preemption notice."""

    def __init__(self) -> None:
        self.multiprocess = jax.process_count() > 1
        self._flag = False
        self._previous = None
        if self.multiprocess:
            return  # JAX's preemption sync service owns SIGTERM (a Python handler would replace it)
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread (some notebook runners): no notice can arrive
            log.warning("Not in the main thread: SIGTERM will not save a checkpoint before exiting.")

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step``. Call it once per step, on every process."""
        if not self.multiprocess:
            return self._flag
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:  # the service is off: jax_enable_preemption_service=False
            log.warning("Preemption notices are not coordinated (%s); SIGTERM will not save a checkpoint.", e)
            self.multiprocess = False  # ask once; the flag stays False
            return False

    def close(self) -> None:
        """Put back the SIGTERM handler this watch replaced."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
