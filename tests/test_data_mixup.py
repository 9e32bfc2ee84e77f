"""Mixup / CutMix on the device (:func:`bvit_jax.data.device.mix_batch`) and the host's smoothed one-hot targets:
mixed targets that match the mixed pixels, determinism by key.

Row-sum comparisons use bounds derived from float32 arithmetic (``gamma_n``, ``tests/tolerances.py``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bvit_jax.data import device, mixup
from tests.tolerances import U32, assert_within, gamma_n


def test_smooth_one_hot_host_and_device_agree():
    y = mixup.smooth_one_hot(np.array([2, 0]), 4, 0.1)
    np.testing.assert_allclose(y, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])
    # The same float32 constants (computed in float64, rounded once) on both sides: bit for bit.
    np.testing.assert_array_equal(np.asarray(device.smooth_one_hot(jnp.array([2, 0]), 4, 0.1)), y)


@functools.cache
def _mixer(**kw):
    return jax.jit(lambda x, y, k: device.mix_batch(x, y, k, **kw))  # one compilation per setting and shape


def _mix(x, labels, key, **kw):
    return [np.asarray(v) for v in _mixer(**kw)(x, labels, key)]


def test_mixup_and_cutmix_targets_match_the_pixels():
    b, hw, k = 4, 16, 5
    labels = jnp.array([0, 1, 2, 3])
    images = jnp.stack([jnp.full((hw, hw, 1), i, jnp.float32) for i in range(b)])
    seen = set()
    kw = dict(num_classes=k, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.0)
    for seed in range(40):
        x, y, idx = _mix(images, labels, jax.random.key(seed), **kw)
        # 5 float32 entries, each within 3u of exact (1 - lam, the two products, their sum), summed in
        # any order: |sum - 1| <= gamma_{K+3}.
        assert_within(y.sum(1), 1.0, gamma_n(k + 3), "row sums")
        # Image 0 is mixed with image 3: its pixels' mean says how much of 3. The mean of 256 pixels
        # (each within 3u * 3 of exact: two roundings of values <= 3) and the targets (3u): 256-term sums.
        frac3 = x[0].mean() / 3.0
        assert_within(y[0, 3], frac3, gamma_n(256 + 3) * 3, "share of image 3")
        assert_within(y[0, 0], 1 - frac3, gamma_n(256 + 3) * 3, "share of image 0")
        lab = np.asarray(labels)
        np.testing.assert_array_equal(idx, np.where(y[np.arange(b), lab] >= 0.5, lab, lab[::-1]))
        cut = np.isin(np.unique(x[0]), [0.0, 3.0]).all()
        seen.add("cutmix" if cut and 0 < frac3 < 1 else ("none" if frac3 == 0 else "mixup"))
    assert seen == {"cutmix", "mixup"}
    # The same key gives the same batch bit for bit; another key another one.
    a = _mix(images, labels, jax.random.key(7), **kw)
    for u, v in zip(a, _mix(images, labels, jax.random.key(7), **kw)):
        np.testing.assert_array_equal(u, v)
    assert not all(np.array_equal(u, v) for u, v in zip(a, _mix(images, labels, jax.random.key(8), **kw)))


def test_mixup_is_the_textbook_formula_and_off_means_untouched():
    k = 7
    for b in (5, 6):  # odd batch sizes: the middle example is mixed with itself
        x0 = jax.random.normal(jax.random.key(b), (b, 8, 8, 3))
        x, y, _ = _mix(
            x0, jnp.arange(b), jax.random.key(1), num_classes=k, mixup_alpha=1.0, cutmix_alpha=0.0, smoothing=0.0
        )
        lam = y[0, 0]
        x0 = np.asarray(x0, np.float64)
        # x[::-1] + lam (x - x[::-1]): three roundings, each within u of values <= |x| + |x[::-1]|.
        bound = 3 * U32 * (np.abs(x0) + np.abs(x0[::-1])) * (1 + 3 * U32)
        assert_within(x, lam * x0 + (1 - lam) * x0[::-1], bound, "mixup")
    # Both off: smoothing only, images bit for bit.
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    x, y, idx = _mix(
        images, jnp.arange(4), jax.random.key(0), num_classes=5, mixup_alpha=0, cutmix_alpha=0, smoothing=0.1
    )
    np.testing.assert_array_equal(x, np.asarray(images))
    np.testing.assert_array_equal(y, mixup.smooth_one_hot(np.arange(4), 5, 0.1))
    # mix_prob 0: never mixed, whatever the key.
    for seed in range(5):
        x, y, idx = _mix(images, jnp.arange(4), jax.random.key(seed), num_classes=5, mix_prob=0.0, smoothing=0.0)
        np.testing.assert_array_equal(x, np.asarray(images))
        np.testing.assert_array_equal(idx, np.arange(4))
