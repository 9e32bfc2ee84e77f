"""Any TFDS image data set by name: a small grayscale one, built by TFDS.

TFDS's ad-hoc builder writes a 28 px grayscale data set (PNG-encoded by
TFDS, like mnist / fashion_mnist) as ArrayRecord; the pipeline reads it by
name through the same code as ImageNet, as 3 channels at 32 px.
"""

import numpy as np
import pytest

from bvit_jax import data
from tests.data_fixtures import device_batch


@pytest.fixture(scope="module")
def tiny_gray(tmp_path_factory):
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path_factory.mktemp("tfds_adhoc"))
    rng = np.random.default_rng(0)

    def examples(n):
        # Class c images have brightness ~ 60 * c, to check labels survive.
        return [
            (
                i,
                {
                    "image": np.clip(rng.normal(60 * (i % 4) + 30, 10, (28, 28, 1)), 0, 255).astype(np.uint8),
                    "label": i % 4,
                },
            )
            for i in range(n)
        ]

    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(28, 28, 1)), "label": tfds.features.ClassLabel(num_classes=4)}
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_gray",
        version="1.0.0",
        features=features,
        split_datasets={"train": examples(12), "test": examples(6)},
        data_dir=data_dir,
        file_format="array_record",
    )
    return data_dir


def _config(data_dir):
    c = data.default_data_config("tiny_gray")
    c.data_dir = data_dir
    c.eval_split = "test"
    c.image_size, c.channels = 32, 3  # the model wants 3 channels at 32 px
    c.train_crop, c.pad_size, c.eval_crop = "pad_random_crop", 2, "resize"
    c.randaugment, c.random_erase_prob = "", 0.0
    c.mixup_alpha = c.cutmix_alpha = 0.0
    c.repeated_aug = 1
    c.mean, c.std = (0.5,), (0.25,)
    return c


def test_other_tfds_dataset_by_name_gray_to_rgb(tiny_gray):
    c = _config(tiny_gray)
    assert data.dataset_info(c) == data.DatasetInfo(num_classes=4, image_shape=(32, 32, 3), num_train=12, num_eval=6)
    b = device_batch(next(data.create_train_iterator(c, 4, 0, 0, 1)), c, 4)
    assert b["image"].shape == (4, 32, 32, 3) and b["label"].shape == (4, 4)
    np.testing.assert_allclose(b["image"][..., 0], b["image"][..., 1])
    batches = list(data.create_eval_iterator(c, 4, 0, 1))
    assert [x["mask"].sum() for x in batches] == [4, 2]
    for x in batches:
        for img, label, m in zip(x["image"], x["label"], x["mask"]):
            if m:  # brightness identifies the class
                mean = img.mean() * 0.25 + 0.5
                assert abs(mean * 255 - (60 * label + 30)) < 10
