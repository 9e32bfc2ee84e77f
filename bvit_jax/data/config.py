"""Input-pipeline configuration: every knob of `bvit_jax.data` in one ConfigDict.

`default_data_config(name)` returns the preset for a data set; configs override
fields, e.g. ``--config.data.data_dir=/data/tfds``. The ImageNet preset is
DeiT's training recipe (Touvron et al. 2021, "Training data-efficient image
transformers", Table 9 / timm arguments of the official DeiT repository):

=========================  ===================================================
RandomResizedCrop          224 px, scale (0.08, 1), ratio (3/4, 4/3), bicubic
horizontal flip            p = 0.5
RandAugment                timm string ``rand-m9-mstd0.5-inc1``
random erasing             p = 0.25, per-pixel N(0, 1) fill
Mixup / CutMix             alpha 0.8 / 1.0, switch prob 0.5, mix prob 1.0
label smoothing            0.1
repeated augmentation      3 (DeiT's RASampler; set 1 to switch off)
eval                       resize shorter side to 224 / 0.875 = 256, centre
                           crop 224 (bicubic)
normalisation              ImageNet mean (0.485, 0.456, 0.406),
                           std (0.229, 0.224, 0.225)
=========================  ===================================================

Field reference (all fields exist in every preset):

Data set
  name           TFDS name (``imagenet2012``, ``cifar10``, ``imagenette``, ...)
                 or ``fashion_mnist`` / ``mnist`` (read from IDX files when
                 ``source == 'idx'``).
  source         ``'tfds'``: ``tfds.data_source`` over an ArrayRecord build in
                 ``data_dir``; ``'idx'``: the raw IDX files in ``idx_dir``.
  data_dir       TFDS data dir (None: TFDS's default, ``~/tensorflow_datasets``
                 or ``$TFDS_DATA_DIR``).
  manual_dir     Where the ImageNet tars are (prepare time only).
  idx_dir        Folder with ``train-images-idx3-ubyte.gz`` etc.
  train_split    TFDS split spec, slicing allowed: ``'train'``,
                 ``'train[:90%]'``, ``'train[:50000]'``.
  eval_split     Same, e.g. ``'validation'``, ``'test'``, ``'train[90%:]'``.
  image_key      Feature holding the image (``'image'``).
  label_key      Feature holding the class (``'label'``).
  num_classes    None: read from the TFDS ClassLabel / IDX labels.

Geometry
  image_size     Output side in pixels (square).
  channels       3 (RGB; grayscale is replicated) or 1 (luma).
  interpolation  ``'bicubic'`` | ``'bilinear'`` | ``'nearest'`` for resizes.
  jpeg_draft     Train: use PIL's JPEG ``draft()`` (DCT-domain downscale by
                 1/2, 1/4, 1/8 while decoding) when the region to be resized
                 stays at least the output size after it; see `augment.py`
                 (mean difference < 1 grey level; 1.3x faster train crops
                 on 1000 x 750 JPEGs, no change at 500 x 375).
  eval_jpeg_draft  The same for eval; off by default so that eval pixels are
                 exactly torchvision's Resize + CenterCrop arithmetic.

Train augmentation
  train_crop     ``'random_resized_crop'`` (ImageNet), ``'pad_random_crop'``
                 (small images), ``'resize'`` (none).
  rrc_scale      RandomResizedCrop area fraction range.
  rrc_ratio      RandomResizedCrop aspect ratio (w/h) range.
  pad_size       Zero padding on each side for ``pad_random_crop``.
  flip_prob      Horizontal flip probability.
  randaugment    timm-style policy string (``'rand-m9-mstd0.5-inc1'``) or ''
                 for none; see `augment.RandAugment`.
  random_erase_prob   timm RandomErasing probability (pixel mode, 1 box).
  mixup_alpha    Beta(alpha, alpha) for Mixup lambda; 0 disables.
  cutmix_alpha   Beta(alpha, alpha) for CutMix lambda; 0 disables.
  mix_prob       Probability that a batch is mixed at all.
  mix_switch_prob  With both on: probability of CutMix instead of Mixup.
  label_smoothing  Soft targets ``(1 - s) * onehot + s / K``.
  repeated_aug   Repeats per image per epoch (DeiT's RASampler), 1 = off.
  max_decode_retries  How many replacement examples to try for an
                 undecodable train image before raising.

Eval
  eval_crop      ``'center_crop'`` (resize shorter side to
                 ``image_size / crop_ratio``, centre crop) or ``'resize'``
                 (to ``image_size`` x ``image_size``; native size: no-op).
  crop_ratio     0.875 on ImageNet (224 / 256).

Normalisation
  mean, std      In [0, 1] units, one value or one per channel;
                 ``x = (pixel / 255 - mean) / std``.

Loading
  num_workers    grain worker processes (``mp_prefetch``); 0 = in-process;
                 -1 = sized to the host (`resolve_num_workers`: the usable
                 cores minus 2, at least 1). Presets: 0; the ImageNet
                 training configs (``recipes.imagenet_deit_config``): -1.
  num_threads    grain reader threads per process (each builds whole batches).
  prefetch       Batches buffered per process / per worker.
  return_index   Also return ``'index'`` (int32, position in the split; -1 on
                 eval padding): for debugging and coverage tests.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST training-set pixel statistics (computed from the IDX files).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Files TFDS builders read from their manual dir, with the official sizes
# in bytes (a smaller file is most likely an interrupted download).
MANUAL_FILES = {
    "imagenet2012": {
        "ILSVRC2012_img_train.tar": 147_897_477_120,
        "ILSVRC2012_img_val.tar": 6_744_924_160,
    },
}

DEFAULT_IDX_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}

_SMALL_DATASETS = {
    # name: (native size, channels, mean, std, eval split)
    "fashion_mnist": (28, 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "test"),
    "mnist": (28, 1, MNIST_MEAN, MNIST_STD, "test"),
    "cifar10": (32, 3, CIFAR10_MEAN, CIFAR10_STD, "test"),
    "cifar100": (32, 3, CIFAR10_MEAN, CIFAR10_STD, "test"),
}


AUTO_WORKERS = -1


def channel_vector(value, channels: int) -> np.ndarray:
    """A config value given once or per channel (``mean``, ``std``) as a float32 vector of ``channels``."""
    v = np.asarray(value, np.float32).reshape(-1)
    return np.broadcast_to(v, (channels,)).astype(np.float32)


def field(config, key: str, default=None):
    """``config.key`` of a ConfigDict, a plain dict (e.g. a workdir's
    ``config.json``) or any object with attributes; `default` when absent."""
    if hasattr(config, "get") and not dataclasses.is_dataclass(config):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def resolve_num_workers(num_workers: int) -> int:
    """The grain worker-process count for ``config.num_workers``.

    ``n >= 0``: ``n``. ``-1`` (`AUTO_WORKERS`): ``max(1, cores - 2)`` with
    ``cores`` the CPUs this process may run on (``os.sched_getaffinity``,
    else ``os.cpu_count()``): one worker per core, two cores left for the
    trainer's own process (the step loop, transfers) and the eval workers'
    bursts. Anything else raises ``ValueError``.
    """
    n = int(num_workers)
    if n >= 0:
        return n
    if n != AUTO_WORKERS:
        raise ValueError(f"data.num_workers must be >= 0 or -1 (auto), got {n}")
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 2)


def default_data_config(name: str = "imagenet2012") -> ml_collections.ConfigDict:
    """The data preset for `name`; see the module docstring for each field.

    ``imagenet2012`` (and any unknown large-image TFDS name, e.g.
    ``imagenette``) gets DeiT's recipe at 224 px. ``fashion_mnist`` / ``mnist``
    read the Debian IDX files at their native 28 px with pad-2 random crop and
    flip; ``cifar10`` / ``cifar100`` use pad-4 random crop and flip at 32 px.
    Small presets have no RandAugment, Mixup, CutMix or random erasing.
    """
    c = ml_collections.ConfigDict()
    c.name = name
    c.source = "tfds"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.manual_dir = ml_collections.config_dict.placeholder(str)
    c.idx_dir = ml_collections.config_dict.placeholder(str)
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_key = "image"
    c.label_key = "label"
    c.num_classes = ml_collections.config_dict.placeholder(int)

    c.image_size = 224
    c.channels = 3
    c.interpolation = "bicubic"
    c.jpeg_draft = True
    c.eval_jpeg_draft = False

    c.train_crop = "random_resized_crop"
    c.rrc_scale = (0.08, 1.0)
    c.rrc_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.pad_size = 4
    c.flip_prob = 0.5
    c.randaugment = "rand-m9-mstd0.5-inc1"
    c.random_erase_prob = 0.25
    c.mixup_alpha = 0.8
    c.cutmix_alpha = 1.0
    c.mix_prob = 1.0
    c.mix_switch_prob = 0.5
    c.label_smoothing = 0.1
    c.repeated_aug = 3
    c.max_decode_retries = 10

    c.eval_crop = "center_crop"
    c.crop_ratio = 0.875

    c.mean = IMAGENET_MEAN
    c.std = IMAGENET_STD

    c.num_workers = 0
    c.num_threads = 4
    c.prefetch = 4
    c.return_index = False

    if name in _SMALL_DATASETS:
        size, channels, mean, std, eval_split = _SMALL_DATASETS[name]
        if name in DEFAULT_IDX_DIRS:
            c.source = "idx"
            c.idx_dir = DEFAULT_IDX_DIRS[name]
        c.eval_split = eval_split
        c.image_size = size
        c.channels = channels
        c.interpolation = "bilinear"
        c.train_crop = "pad_random_crop"
        c.pad_size = 2 if size == 28 else 4
        c.randaugment = ""
        c.random_erase_prob = 0.0
        c.mixup_alpha = 0.0
        c.cutmix_alpha = 0.0
        c.repeated_aug = 1
        c.eval_crop = "resize"
        c.mean = mean
        c.std = std
    return c
