"""Label smoothing on the host; batch Mixup / CutMix run on the device (`device.mix_batch`).

DeiT trains with Mixup (Zhang et al. 2018) alpha 0.8 and CutMix (Yun et al.
2019) alpha 1.0, one of the two per batch (CutMix with probability
``switch_prob = 0.5``), applied to every batch (``mix_prob = 1``), label
smoothing 0.1. In batch mode every example ``i`` is mixed with example
``B - 1 - i`` (the batch reversed) using one ``lambda`` for the whole batch.
"""

from __future__ import annotations

import numpy as np


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """``(1 - s) * onehot + s / K``: on-value ``1 - s + s/K``, off ``s/K``."""
    off = smoothing / num_classes
    out = np.full((len(labels), num_classes), off, np.float32)
    out[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return out
