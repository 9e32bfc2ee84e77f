"""The device half of the input pipeline (:mod:`bvit_jax.data.device`), the run's one eval iterator
(:class:`bvit_jax.data.EvalPasses`) and the automatic worker count.

Normalisation bound: the host computes ``fl(fl(p * s) + o)`` (numpy, two roundings); XLA may fuse the
device's ``p * s + o`` into one multiply-add (one rounding). Both are within ``u |p s| + u |x|`` resp.
``u |x|`` of the exact ``p s + o`` plus the host's own sum rounding, so they differ by at most
``u (|p s| (1 + u) + 2 |x|)`` with ``u = 2^-24`` (``x`` the host result).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bvit_jax import data
from bvit_jax.data import eval_transform, mixup
from tests.tolerances import U32, assert_within, gamma_n


def _norm_bound(pixels, host, config):
    scale = eval_transform.Normalize(config.mean, config.std, config.channels).scale.astype(np.float64)
    ps = np.abs(pixels.astype(np.float64) * scale)
    return U32 * (ps * (1 + U32) + 2 * np.abs(host.astype(np.float64)))


def test_uint8_batches_normalised_on_device_equal_the_host_float_pipeline():
    """Fashion-MNIST (the study's regime): 3 train batches and a whole eval pass of 300 test images.

    Train: the old host batch was ``Normalize(uint8)`` and ``smooth_one_hot(label)``; the device's images are
    within the stated bound of it (in practice equal or 1 ulp apart), its targets and label_index bit for bit.
    Eval: `EvalPasses` (uint8) + device == `create_eval_iterator` (host float, = `eval_preprocess`), zeros on
    padding exactly.
    """
    c = data.default_data_config("fashion_mnist")
    prep = data.DevicePreprocess.from_config(c, 10, seed=0)
    norm = eval_transform.Normalize(c.mean, c.std, c.channels)
    train = jax.jit(lambda b, s: prep(b, prep.key(s)))
    it = data.create_train_iterator(c, 64, seed=0, process_index=0, process_count=1)
    for step in range(3):
        host = next(it)
        assert host["image"].dtype == np.uint8 and host["label"].dtype == np.int32
        out = {k: np.asarray(v) for k, v in train(host, step).items()}
        ref = norm(host["image"])
        assert_within(out["image"], ref, _norm_bound(host["image"], ref, c), "train images")
        np.testing.assert_array_equal(out["label"], mixup.smooth_one_hot(host["label"], 10, 0.1))
        np.testing.assert_array_equal(out["label_index"], host["label"])

    c.eval_split = "test[:300]"  # 3 batches of 128, the last one padded with 84 masked rows
    passes = data.EvalPasses(c, 128, 0, 1)
    evaluate = jax.jit(lambda b: prep(b))
    host_float = list(data.create_eval_iterator(c, 128, 0, 1))
    hosts = list(passes.one_pass())
    assert len(hosts) == len(host_float) == passes.num_batches == 3
    for u8, h in zip(hosts, host_float):
        assert u8["image"].dtype == np.uint8
        g = evaluate(u8)
        np.testing.assert_array_equal(np.asarray(g["mask"]), h["mask"])
        x = np.asarray(g["image"])
        assert_within(x, h["image"], _norm_bound(u8["image"], h["image"], c), "eval images")
        np.testing.assert_array_equal(x[~h["mask"]], 0.0)
    assert int(sum(h["mask"].sum() for h in host_float)) == 300


def test_eval_passes_give_every_example_once_the_same_each_pass():
    c = data.default_data_config("fashion_mnist")
    c.eval_split, c.return_index = "test[:50]", True
    passes = data.EvalPasses(c, 16, 0, 1)  # 4 batches, 14 padding rows
    runs = []
    for _ in range(3):
        runs.append([(b["index"].copy(), b["mask"].copy(), b["image"].copy()) for b in passes.one_pass()])
    for run in runs:
        index = np.concatenate([i for i, _, _ in run])
        mask = np.concatenate([m for _, m, _ in run])
        assert len(run) == 4
        np.testing.assert_array_equal(np.sort(index[mask]), np.arange(50))  # each example exactly once
        assert np.all(index[~mask] == -1) and mask.sum() == 50  # padding masked
        for (i, m, x), (i0, m0, x0) in zip(run, runs[0]):
            np.testing.assert_array_equal(m, m0)
            np.testing.assert_array_equal(i, i0)
            np.testing.assert_array_equal(x, x0)
    # A pass abandoned half way is completed, unseen, before the next one: passes stay aligned.
    gen = passes.one_pass()
    next(gen)
    gen.close()
    again = [b["index"] for b in passes.one_pass()]
    for a, (i0, _, _) in zip(again, runs[0]):
        np.testing.assert_array_equal(a, i0)


def _imagenet_like(**kw):
    c = data.default_data_config("imagenet2012")
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_device_train_preprocessing_is_keyed_and_mixes_labels_to_one():
    """The full DeiT recipe (erasing 0.25, Mixup / CutMix, smoothing 0.1) on a random uint8 batch."""
    k = 1000
    c = _imagenet_like()
    prep = data.DevicePreprocess.from_config(c, k, seed=3)
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, k, 8, np.int32)}
    f = jax.jit(lambda b, s: prep(b, prep.key(s)))
    a, a2, b = f(host, 5), f(host, 5), f(host, 6)
    for key in ("image", "label", "label_index"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(a2[key]))  # same step -> same batch
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    # Another run seed, another stream.
    other = data.DevicePreprocess.from_config(c, k, seed=4)
    assert not np.array_equal(
        np.asarray(jax.jit(lambda h: other(h, other.key(5)))(host)["image"]), np.asarray(a["image"])
    )
    mixed = 0
    for step in range(12):
        out = {n: np.asarray(v) for n, v in f(host, step).items()}
        # K entries, each within 4u of exact (the smoothed constant, 1 - lam, the product, the sum), any order.
        assert_within(out["label"].sum(1), 1.0, gamma_n(k + 4), "row sums")
        assert np.all(out["label"] > 0) and np.all(np.isfinite(out["image"]))
        top2 = np.sort(out["label"], axis=1)[:, -2:]
        mixed += int(np.sum(top2[:, 0] > 0.01))
        strict = top2[:, 1] > top2[:, 0]
        np.testing.assert_array_equal(out["label"].argmax(1)[strict], out["label_index"][strict])
    assert mixed > 0


def test_device_random_erasing_fills_one_box_with_noise():
    c = _imagenet_like(random_erase_prob=1.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    prep = data.DevicePreprocess.from_config(c, 10, seed=0)
    host = {"image": np.full((6, 32, 32, 3), 128, np.uint8), "label": np.arange(6, dtype=np.int32)}
    x = np.asarray(jax.jit(lambda b: prep(b, prep.key(0)))(host)["image"])
    plain = eval_transform.Normalize(c.mean, c.std, c.channels)(host["image"])  # within ~1 ulp of the device's
    for i in range(6):
        changed = np.any(np.abs(x[i] - plain[i]) > 1e-3, -1)  # noise, not rounding (N(0, 1) within 1e-3 of the
        # normalised grey: probability ~1e-3 * 0.8 per value, all three channels at once ~1e-9)
        rows, cols = np.nonzero(changed)
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        # One rectangle of area U(0.02, 1/3) of the image (rounded sides: +-1 px each).
        assert 0.02 * 1024 * 0.5 <= area <= 1024 / 3 * 1.3
        assert changed.sum() == area
        assert abs(float(x[i][changed].mean())) < 0.5 and 0.6 < float(x[i][changed].std()) < 1.4  # N(0, 1)


def test_hand_made_float_batches_pass_through_unchanged():
    c = _imagenet_like()
    prep = data.DevicePreprocess.from_config(c, 4, seed=0)
    batch = {
        "image": jnp.ones((2, 8, 8, 3)),
        "label": jax.nn.one_hot(jnp.array([0, 1]), 4),
        "label_index": jnp.array([0, 1]),
    }
    out = prep(batch, prep.key(0))
    for key in batch:
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(batch[key]))


def test_auto_worker_count():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert data.resolve_num_workers(0) == 0
    assert data.resolve_num_workers(3) == 3
    assert data.resolve_num_workers(-1) == max(1, cores - 2)
    with pytest.raises(ValueError, match="num_workers"):
        data.resolve_num_workers(-2)
    # The ImageNet training configs default to it; Fashion-MNIST stays in-process.
    from bvit_jax.train import recipes

    assert recipes.imagenet_deit_config("deit_small", "binaryvit").data.num_workers == -1
    assert data.default_data_config("fashion_mnist").num_workers == 0
