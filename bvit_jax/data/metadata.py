"""Data-set metadata: sizes, image shape and class names of a data config, without reading images.

`dataset_info(config)` (a `DatasetInfo`: classes, ``(H, W, C)``, train and
eval sizes) is what the model and the schedule need; `class_names(config)`
the names of the labels (IDX data sets: the tables of `sources`; TFDS data
sets: TFDS's metadata).
"""

from __future__ import annotations

import dataclasses

from bvit_jax.data import config as config_lib
from bvit_jax.data import sources


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the schedule need to know about the data."""

    num_classes: int
    image_shape: tuple  # (H, W, C) of the batches
    num_train: int  # examples in config.train_split (all processes)
    num_eval: int  # examples in config.eval_split (all processes)


def dataset_info(config) -> DatasetInfo:
    """`DatasetInfo` for a data config, from metadata only (no images read)."""
    info = sources.source_info(config, [config.train_split, config.eval_split])
    return DatasetInfo(
        num_classes=info.num_classes,
        image_shape=(int(config.image_size), int(config.image_size), int(config.channels)),
        num_train=int(info.num_examples[config.train_split]),
        num_eval=int(info.num_examples[config.eval_split]),
    )


def class_names(config) -> list[str] | None:
    """The names of the labels ``0 .. K-1`` of a data config, or None.

    ``fashion_mnist`` / ``mnist`` read from IDX files: the data set's names
    (Fashion-MNIST: ``T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal,
    Shirt, Sneaker, Bag, Ankle boot``; MNIST: the digits). TFDS data sets:
    the names of the label feature in the TFDS metadata (`config.label_key`,
    a ``ClassLabel``; for ``imagenet2012`` the 1000 WordNet synset ids
    ``n01440764, ...`` in label order). The metadata comes with TFDS's
    builder code, so the data set need not be prepared. Returns None when the
    data set has no names (unknown to TFDS, a label without names, TFDS not
    installed) or when ``config.num_classes`` is set and differs from their
    number.
    """
    name = config_lib.field(config, "name")
    names = None
    if config_lib.field(config, "source", "tfds") == "idx":
        names = sources.IDX_CLASSES.get(name)
    elif name:
        try:
            import tensorflow_datasets as tfds

            builder = tfds.builder(name, data_dir=config_lib.field(config, "data_dir"))
            feature = builder.info.features[config_lib.field(config, "label_key", "label")]
            names = getattr(feature, "names", None)
        except (ImportError, KeyError, ValueError):  # incl. DatasetNotFoundError
            names = None
    if not names:
        return None
    names = [str(n) for n in names]
    num_classes = config_lib.field(config, "num_classes")
    if num_classes is not None and int(num_classes) != len(names):
        return None
    return names
