"""Mixup / CutMix (:mod:`bvit_jax.data.mixup`): smoothed one-hot targets, and mixed targets that match the
mixed pixels.

The row-sum comparison uses a bound derived from float32 arithmetic (``gamma_n``, ``tests/tolerances.py``),
so it holds whatever order numpy sums in.
"""

import numpy as np

from bvit_jax.data import mixup
from tests.tolerances import assert_within, gamma_n


def test_smooth_one_hot():
    y = mixup.smooth_one_hot(np.array([2, 0]), 4, 0.1)
    np.testing.assert_allclose(y, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])


def test_mixup_and_cutmix_targets_match_the_pixels():
    b, hw, k = 4, 16, 5
    labels = np.array([0, 1, 2, 3])
    images = np.stack([np.full((hw, hw, 1), i, np.float32) for i in range(b)])
    seen = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x, y, idx = mixup.mix_batch(
            images.copy(), labels, rng, num_classes=k, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.0
        )
        # 5 float32 entries, each within 3u of exact (lam, 1 - lam, their products), summed in any
        # order (numpy's SIMD width differs by CPU): |sum - 1| <= gamma_{K+3} * 1.
        assert_within(y.sum(1), 1.0, gamma_n(k + 3), "row sums")
        # Image 0 is mixed with image 3: its pixels' mean says how much of 3.
        frac3 = x[0].mean() / 3.0
        np.testing.assert_allclose(y[0, 3], frac3, atol=1e-5)
        np.testing.assert_allclose(y[0, 0], 1 - frac3, atol=1e-5)
        np.testing.assert_array_equal(idx, np.where(y[np.arange(b), labels] >= 0.5, labels, labels[::-1]))
        cut = np.isin(np.unique(x[0]), [0.0, 3.0]).all()
        seen.add("cutmix" if cut and 0 < frac3 < 1 else "mixup")
    assert seen == {"cutmix", "mixup"}
    # Mixup equals the textbook formula, odd batch sizes included.
    for b in (5, 6):
        x0 = np.random.default_rng(b).normal(size=(b, 8, 8, 3)).astype(np.float32)
        x, y, _ = mixup.mix_batch(
            x0.copy(),
            np.arange(b),
            np.random.default_rng(1),
            num_classes=k + 2,
            mixup_alpha=1.0,
            cutmix_alpha=0.0,
            smoothing=0.0,
        )
        lam = y[0, 0]
        np.testing.assert_allclose(x, lam * x0 + (1 - lam) * x0[::-1], atol=1e-5)
    # Both off: smoothing only.
    x, y, idx = mixup.mix_batch(
        images.copy(), labels, np.random.default_rng(0), num_classes=k, mixup_alpha=0, cutmix_alpha=0, smoothing=0.1
    )
    np.testing.assert_array_equal(x, images)
    np.testing.assert_allclose(y.max(1), 0.92)
