"""Counters of the input pipeline: `data_stats()`, `reset_data_stats()`.

`data_stats()` returns the counts as seen by this process's consumer (also
with ``num_workers > 0``: counts travel inside the batches, as the private
``'_bad'`` / ``'_unreadable'`` entries, and `CountAndStrip`, the last stage of
every iterator, adds them up when the batch is taken and drops them).
"""

from __future__ import annotations

import collections
import threading

import grain
import numpy as np

_STATS: collections.Counter = collections.Counter()
_STATS_LOCK = threading.Lock()


def data_stats() -> dict[str, int]:
    """Counts so far in this process.

    Keys: ``train_examples`` (examples in train batches taken),
    ``train_skipped`` (train records replaced by other examples because their
    image cannot be decoded or the record cannot be read),
    ``train_unreadable`` (the part of ``train_skipped`` that could not be
    read: damaged chunks), ``eval_examples`` (real eval examples taken,
    padding excluded), ``eval_undecodable`` (eval examples masked out because
    they cannot be decoded or read), ``eval_unreadable`` (the part of
    ``eval_undecodable`` that could not be read).
    """
    with _STATS_LOCK:
        out = {
            k: 0
            for k in (
                "train_examples",
                "train_skipped",
                "train_unreadable",
                "eval_examples",
                "eval_undecodable",
                "eval_unreadable",
            )
        }
        out.update(_STATS)
        return out


def reset_data_stats() -> None:
    """Sets all `data_stats` counters to zero."""
    with _STATS_LOCK:
        _STATS.clear()


class CountAndStrip(grain.transforms.Map):
    """Runs in the consuming process: adds the batch's counts, drops them."""

    def __init__(self, prefix: str):
        self._prefix = prefix

    def map(self, batch):
        bad = int(np.sum(batch.pop("_bad")))
        unreadable = int(np.sum(batch.pop("_unreadable")))
        if self._prefix == "train":
            n = len(batch["label"])
            update = {"train_examples": n, "train_skipped": bad, "train_unreadable": unreadable}
        else:
            n = int(np.sum(batch["mask"]))
            update = {"eval_examples": n, "eval_undecodable": bad, "eval_unreadable": unreadable}
        with _STATS_LOCK:
            _STATS.update(update)
        return batch
