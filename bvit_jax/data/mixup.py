"""Batch-level Mixup / CutMix with label smoothing (timm's ``Mixup``, batch mode).

DeiT trains with Mixup (Zhang et al. 2018) alpha 0.8 and CutMix (Yun et al.
2019) alpha 1.0, one of the two per batch (CutMix with probability
``switch_prob = 0.5``), applied to every batch (``mix_prob = 1``), label
smoothing 0.1. In batch mode every example ``i`` is mixed with example
``B - 1 - i`` (the batch reversed) using one ``lambda`` for the whole batch.
"""

from __future__ import annotations

import math

import numpy as np


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """``(1 - s) * onehot + s / K``: on-value ``1 - s + s/K``, off ``s/K``."""
    off = smoothing / num_classes
    out = np.full((len(labels), num_classes), off, np.float32)
    out[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return out


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix box ``(y0, y1, x0, x1)`` covering about ``1 - lam`` of the image.

    Cut sides ``int(H * sqrt(1 - lam))``, ``int(W * sqrt(1 - lam))``; centre
    uniform over the image; the box is clipped at the borders (so the real
    mixed area is measured afterwards, timm's ``correct_lam``).
    """
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(rng.integers(0, height))
    cx = int(rng.integers(0, width))
    y0 = int(np.clip(cy - cut_h // 2, 0, height))
    y1 = int(np.clip(cy + cut_h // 2, 0, height))
    x0 = int(np.clip(cx - cut_w // 2, 0, width))
    x1 = int(np.clip(cx + cut_w // 2, 0, width))
    return y0, y1, x0, x1


def _mixup_pairs_inplace(x: np.ndarray, lam: float) -> None:
    """``x[i], x[j] = lam x[i] + (1-lam) x[j], lam x[j] + (1-lam) x[i]`` for
    ``j = B - 1 - i``, one pair at a time (temporaries stay in cache)."""
    lam = np.float32(lam)
    for i in range(len(x) // 2):
        a, b = x[i], x[len(x) - 1 - i]
        d = a - b
        d *= lam  # lam (a - b)
        new_a = b + d  # lam a + (1 - lam) b
        np.subtract(a, d, out=b)  # lam b + (1 - lam) a
        a[...] = new_a


def mix_batch(
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    mix_prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.1,
):
    """Mixes a batch in place; returns ``(images, soft_labels, label_index)``.

    ``lam ~ Beta(a, a)``. Mixup: ``x = lam * x + (1 - lam) * x[::-1]``. CutMix:
    paste the box of `cutmix_box` from ``x[::-1]`` and set
    ``lam = 1 - box_area / (H * W)``. Targets:
    ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])`` (rows sum to 1).
    ``label_index`` is the dominant label: ``y`` if ``lam >= 0.5`` else
    ``y[::-1]``. Works for `images` ``[B, H, W, C]`` float.
    """
    lam, use_cutmix = 1.0, False
    if (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < mix_prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < switch_prob)
            alpha = cutmix_alpha if use_cutmix else mixup_alpha
        elif mixup_alpha > 0:
            alpha = mixup_alpha
        else:
            use_cutmix, alpha = True, cutmix_alpha
        lam = float(rng.beta(alpha, alpha))
    labels = np.asarray(labels, np.int32)
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if lam == 1.0:
        return images, targets, labels
    if use_cutmix:
        height, width = images.shape[1:3]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
        images[:, y0:y1, x0:x1] = images[::-1, y0:y1, x0:x1].copy()
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    else:
        _mixup_pairs_inplace(images, lam)
    targets = targets * np.float32(lam) + targets[::-1] * np.float32(1.0 - lam)
    index = labels if lam >= 0.5 else labels[::-1].copy()
    return images, targets.astype(np.float32), index
