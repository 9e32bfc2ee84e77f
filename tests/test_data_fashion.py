"""Fashion-MNIST from the Debian IDX files through the same pipeline."""

import os

import numpy as np
import pytest

from bvit_jax import data
from bvit_jax.data import augment, sources
from tests.data_fixtures import device_batch
from tests.tolerances import assert_within, gamma_n

IDX_DIR = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(IDX_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed",
)


def test_idx_files_real_sizes_and_labels():
    assert sources.idx_split_sizes(IDX_DIR) == {"train": 60000, "test": 10000}
    for split, n in (("train", 60000), ("test", 10000)):
        images_path, labels_path = sources.idx_paths(IDX_DIR, split)
        images = sources.read_idx(images_path + ".gz")
        labels = sources.read_idx(labels_path + ".gz")
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.uint8
        # Fashion-MNIST is balanced: 6000 / 1000 per class, classes 0..9.
        np.testing.assert_array_equal(np.bincount(labels), [n // 10] * 10)
        assert 60 < images.mean() < 90  # mean pixel ~ 0.286 * 255
    c = data.default_data_config("fashion_mnist")
    assert data.dataset_info(c) == data.DatasetInfo(
        num_classes=10, image_shape=(28, 28, 1), num_train=60000, num_eval=10000
    )


def test_validation_split_carved_from_train_is_disjoint():
    full = sources.idx_source(IDX_DIR, "train")
    head = sources.idx_source(IDX_DIR, "train[:90%]")
    tail = sources.idx_source(IDX_DIR, "train[90%:]")
    assert (len(head), len(tail)) == (54000, 6000)
    assert sources.resolve_split("train[:90%]", {"train": 60000}) == [("train", 0, 54000)]
    assert sources.resolve_split("train[90%:]", {"train": 60000}) == [("train", 54000, 60000)]
    # Same records as the full split at the right offsets, no overlap.
    for i in (0, 1, 53999):
        np.testing.assert_array_equal(head[i]["image"], full[i]["image"])
    for i in (0, 5999):
        np.testing.assert_array_equal(tail[i]["image"], full[54000 + i]["image"])
        assert tail[i]["label"] == full[54000 + i]["label"]
    with pytest.raises(IndexError):
        head[54000]
    images = sources.read_idx(sources.idx_paths(IDX_DIR, "train")[0] + ".gz")
    head_set = {images[i].tobytes() for i in range(54000)}
    overlap = sum(images[54000 + i].tobytes() in head_set for i in range(6000))
    assert overlap <= 5  # a few exact duplicate images exist in the raw data
    c = data.default_data_config("fashion_mnist")
    c.train_split, c.eval_split = "train[:90%]", "train[90%:]"
    info = data.dataset_info(c)
    assert (info.num_train, info.num_eval) == (54000, 6000)


def test_train_batches_small_image_augmentation():
    c = data.default_data_config("fashion_mnist")
    c.return_index = True
    it = data.create_train_iterator(c, 32, seed=0, process_index=0, process_count=1)
    b = device_batch(next(it), c, 10)
    assert b["image"].shape == (32, 28, 28, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (32, 10)
    # 10 float32 entries within 3u each, summed in any order: |sum - 1| <= gamma_{10+3}.
    assert_within(b["label"].sum(1), 1.0, gamma_n(10 + 3), "row sums")
    assert set(b["label_index"].tolist()) <= set(range(10))
    # The augmented image is the original shifted by at most 2 px (maybe
    # mirrored): check that some shift/flip of the source matches exactly.
    src = sources.idx_source(c.idx_dir, "train")
    x = b["image"][0, ..., 0] * c.std[0] + c.mean[0]
    orig = src[int(b["index"][0])]["image"][..., 0] / 255.0
    padded = np.pad(orig, 2)
    found = any(
        np.allclose(x, cand[dy : dy + 28, dx : dx + 28], atol=1e-5)
        for cand in (padded, padded[:, ::-1])
        for dy in range(5)
        for dx in range(5)
    )
    assert found
    # channels=3 replicates the grayscale image.
    c.channels, c.return_index = 3, False
    b3 = device_batch(next(data.create_train_iterator(c, 4, 0, 0, 1)), c, 10)
    assert b3["image"].shape == (4, 28, 28, 3)
    np.testing.assert_allclose(b3["image"][..., 0], b3["image"][..., 2])


def test_eval_test_split_exactly_once_over_processes():
    c = data.default_data_config("fashion_mnist")
    c.return_index = True
    seen = np.zeros(10000, np.int32)
    counts = set()
    for p in range(3):
        batches = list(data.create_eval_iterator(c, 1024, p, 3))
        counts.add(len(batches))
        for b in batches:
            assert b["image"].shape == (1024, 28, 28, 1)
            np.add.at(seen, b["index"][b["mask"]], 1)
    assert counts == {4}  # ceil(ceil(10000 / 3) / 1024) on every process
    np.testing.assert_array_equal(seen, 1)
    # Eval has no augmentation: the first image is the normalised source image.
    b = next(data.create_eval_iterator(c, 8, 0, 1))
    src = sources.idx_source(c.idx_dir, "test")
    np.testing.assert_allclose(
        b["image"][0, ..., 0], (src[0]["image"][..., 0] / 255.0 - c.mean[0]) / c.std[0], atol=1e-5
    )


def test_pad_random_crop_unit():
    rng = np.random.default_rng(0)
    x = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    outs = {augment.pad_random_crop(x, 1, rng).tobytes() for _ in range(100)}
    assert len(outs) == 9  # 3 x 3 offsets
    assert np.array_equal(augment.pad_random_crop(x, 0, rng), x)
