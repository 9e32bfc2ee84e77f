"""Index arithmetic of the iterators: which source example each position reads, per process.

Sharding: each epoch is one global permutation of the split
(``index_shuffle``, seeded by ``seed + epoch``, identical on all processes);
process ``p`` of ``P`` takes positions ``p, p + P, p + 2P, ...`` of it, so
processes read disjoint examples and together cover ``P * (N // P)`` of the
``N`` examples per epoch (the permutation changes which few are left out).
With ``repeated_aug = r`` position ``g`` shows permuted image ``g // r``
(DeiT's RASampler: each image ``r`` times per epoch, on different processes
when ``P >= r``, ``N / r`` distinct images per epoch).

Eval (finite, one pass): process ``p`` reads the contiguous range
``[p * ceil(N / P), (p + 1) * ceil(N / P))`` of the split, padded to
``ceil(ceil(N / P) / B)`` batches, so all processes yield the same number of
batches and each example appears exactly once with ``mask == True``.
"""

from __future__ import annotations

import grain
import numpy as np
from grain.experimental import index_shuffle


def seed32(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def train_index(
    k: int, *, num_examples: int, seed: int, process_index: int, process_count: int, repeats: int = 1
) -> int:
    """Source index of the `k`-th training example of process `process_index`.

    ``e, j = divmod(k, N // P)``; global position ``g = j * P + p``; source
    index ``perm_e[g // repeats]`` where ``perm_e`` is grain's
    ``index_shuffle`` permutation of ``range(N)`` with seed ``seed + e``.
    """
    n_local = num_examples // process_count
    epoch, j = divmod(int(k), n_local)
    position = (j * process_count + process_index) // repeats
    return int(index_shuffle(position, max_index=num_examples - 1, seed=(seed + epoch) % 2**32, rounds=4))


class TrainIndex(grain.experimental.MapWithIndexTransform):
    def __init__(self, **kwargs):
        self._kwargs = kwargs

    def map_with_index(self, index: int, element):
        del element
        return train_index(index, **self._kwargs)


def eval_range(num_examples: int, process_index: int, process_count: int, batch_size: int) -> tuple[int, int, int]:
    """``(start, stop, num_batches)`` of a process's eval share (see module)."""
    per = -(-num_examples // process_count)
    start = min(process_index * per, num_examples)
    stop = min(start + per, num_examples)
    num_batches = max(1, -(-per // batch_size))
    return start, stop, num_batches
