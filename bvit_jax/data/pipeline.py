"""Train and eval iterators: grain ``MapDataset`` pipelines over `sources`.

Train (infinite, per process)::

  local position k --(train_index: epoch shuffle, process stride, repeats)-->
  source index --(decode, crop, flip, RandAugment; skip bad files)--> uint8
  --batch--> uint8 images + int labels
  --(on device, `device.DevicePreprocess`: normalise, random erasing,
     Mixup/CutMix, smoothing; keyed by the step)--> the model's batch

Every stage before the iterator is a ``MapDataset`` indexed by position, with
randomness from grain's per-index generators, so batch ``b`` is a pure
function of ``(config, seed, process_index, process_count, b)``: the iterator
state is one integer (per grain worker), resuming reproduces the same
sequence, and ``num_threads`` / ``num_workers`` do not change the batches.

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
Each eval image is `eval_preprocess` of its record (settings from
`eval_settings(config)`), the same function ``bvit_jax.deploy.predict`` applies to
image files, computed in two stages: `eval_image` per example, the
normalisation per batch.

Bad images: an undecodable train image is replaced by a random other example
(up to ``max_decode_retries`` tries in a row, then `DataIntegrityError`); an
undecodable eval image gets ``mask == False``. A record that cannot be read
at all (`sources.RecordReadError`: a damaged chunk inside a shard whose
footer is intact) is treated the same way and also counted as unreadable.
`data_stats()` returns the counts as seen by this process's consumer (also
with ``num_workers > 0``: counts travel inside the batches and are added up
when the batch is taken).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading

import grain
import numpy as np
from grain.experimental import index_shuffle
from PIL import Image

from bvit_jax.data import augment, sources
from bvit_jax.data import config as config_lib
from bvit_jax.data import decode as decode_lib

log = logging.getLogger(__name__)


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


# Fashion-MNIST's labels 0-9 (Xiao et al. 2017; TFDS's ClassLabel names).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
_IDX_CLASSES = {"fashion_mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}


def _field(config, key: str, default=None):
    """``config.key`` of a ConfigDict, a plain dict (e.g. a workdir's
    ``config.json``) or any object with attributes; `default` when absent."""
    if hasattr(config, "get") and not dataclasses.is_dataclass(config):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


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
    name = _field(config, "name")
    names = None
    if _field(config, "source", "tfds") == "idx":
        names = _IDX_CLASSES.get(name)
    elif name:
        try:
            import tensorflow_datasets as tfds

            builder = tfds.builder(name, data_dir=_field(config, "data_dir"))
            feature = builder.info.features[_field(config, "label_key", "label")]
            names = getattr(feature, "names", None)
        except (ImportError, KeyError, ValueError):  # incl. DatasetNotFoundError
            names = None
    if not names:
        return None
    names = [str(n) for n in names]
    num_classes = _field(config, "num_classes")
    if num_classes is not None and int(num_classes) != len(names):
        return None
    return names


# ----------------------------------------------------------------------------
# Counters.
# ----------------------------------------------------------------------------

_STATS: collections.Counter = collections.Counter()
_STATS_LOCK = threading.Lock()


def data_stats() -> dict[str, int]:
    """Counts so far in this process.

    Keys: ``train_examples`` (examples in train batches taken),
    ``train_skipped`` (train records replaced by other examples because their
    image cannot be decoded or the record cannot be read),
    ``train_unreadable`` (the part of ``train_skipped`` that could not be
    read: damaged chunks), ``eval_examples`` (real eval examples taken,
    padding excluded), ``eval_undecodable`` (eval examples masked out because
    they cannot be decoded or read), ``eval_unreadable`` (the part of
    ``eval_undecodable`` that could not be read).
    """
    with _STATS_LOCK:
        out = {
            k: 0
            for k in (
                "train_examples",
                "train_skipped",
                "train_unreadable",
                "eval_examples",
                "eval_undecodable",
                "eval_unreadable",
            )
        }
        out.update(_STATS)
        return out


def reset_data_stats() -> None:
    """Sets all `data_stats` counters to zero."""
    with _STATS_LOCK:
        _STATS.clear()


class _CountAndStrip(grain.transforms.Map):
    """Runs in the consuming process: adds the batch's counts, drops them."""

    def __init__(self, prefix: str):
        self._prefix = prefix

    def map(self, batch):
        bad = int(np.sum(batch.pop("_bad")))
        unreadable = int(np.sum(batch.pop("_unreadable")))
        if self._prefix == "train":
            n = len(batch["label"])
            update = {"train_examples": n, "train_skipped": bad, "train_unreadable": unreadable}
        else:
            n = int(np.sum(batch["mask"]))
            update = {"eval_examples": n, "eval_undecodable": bad, "eval_unreadable": unreadable}
        with _STATS_LOCK:
            _STATS.update(update)
        return batch


# ----------------------------------------------------------------------------
# Index arithmetic.
# ----------------------------------------------------------------------------


def _seed32(*parts: int) -> int:
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


class _TrainIndex(grain.experimental.MapWithIndexTransform):
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


# ----------------------------------------------------------------------------
# Per-example and per-batch transforms (picklable, for grain workers).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """The per-image transforms of a data config, train and eval, in one value (:meth:`from_config`).

    What :func:`train_image` (decode, crop, flip, RandAugment) and
    :func:`eval_image` read; built once per pipeline. The eval fields are
    :class:`EvalSettings`' (``size``, ``channels``, ``interpolation``,
    ``eval_crop``, ``crop_ratio``, ``eval_jpeg_draft``).
    """

    size: int
    channels: int
    interpolation: str
    jpeg_draft: bool
    eval_jpeg_draft: bool
    train_crop: str
    rrc_scale: tuple
    rrc_ratio: tuple
    pad_size: int
    flip_prob: float
    randaugment: augment.RandAugment | None
    eval_crop: str
    crop_ratio: float

    @classmethod
    def from_config(cls, c) -> ImageSettings:
        """The settings of data config ``c``; ``ValueError`` for an unknown ``train_crop`` / ``eval_crop``."""
        if c.train_crop not in ("random_resized_crop", "pad_random_crop", "resize"):
            raise ValueError(f"unknown train_crop {c.train_crop!r}")
        if c.eval_crop not in ("center_crop", "resize"):
            raise ValueError(f"unknown eval_crop {c.eval_crop!r}")
        fill = tuple(int(round(255 * m)) for m in config_lib.channel_vector(c.mean, 3))
        ra = augment.RandAugment.from_string(c.randaugment, fill, c.interpolation) if c.randaugment else None
        return cls(
            size=int(c.image_size),
            channels=int(c.channels),
            interpolation=c.interpolation,
            jpeg_draft=bool(c.jpeg_draft),
            eval_jpeg_draft=bool(c.eval_jpeg_draft),
            train_crop=c.train_crop,
            rrc_scale=tuple(c.rrc_scale),
            rrc_ratio=tuple(c.rrc_ratio),
            pad_size=int(c.pad_size),
            flip_prob=float(c.flip_prob),
            randaugment=ra,
            eval_crop=c.eval_crop,
            crop_ratio=float(c.crop_ratio),
        )


def train_image(data, rng: np.random.Generator, s: ImageSettings) -> np.ndarray:
    """Decode + train augmentation of one image -> ``uint8 [H, W, C]``.

    Raises `decode.DecodeError` if the image cannot be decoded.
    """
    img = decode_lib.open_image(data)
    if s.train_crop == "random_resized_crop":
        img = augment.random_resized_crop(
            img,
            s.size,
            rng,
            scale=s.rrc_scale,
            ratio=s.rrc_ratio,
            channels=s.channels,
            interpolation=s.interpolation,
            use_draft=s.jpeg_draft,
        )
        if s.flip_prob > 0 and rng.random() < s.flip_prob:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if s.randaugment is not None:
            img = s.randaugment(img, rng)
        return decode_lib.to_array(img, s.channels)
    img = augment.resize(decode_lib.load(img, s.channels), s.size, s.interpolation)
    x = decode_lib.to_array(img, s.channels)
    if s.train_crop == "pad_random_crop":
        x = augment.pad_random_crop(x, s.pad_size, rng)
    x = augment.random_hflip(x, rng, s.flip_prob)
    if s.randaugment is not None:
        img = Image.fromarray(np.ascontiguousarray(x[..., 0] if s.channels == 1 else x))
        x = decode_lib.to_array(s.randaugment(img, rng), s.channels)
    return np.ascontiguousarray(x)


def eval_image(data, s) -> np.ndarray:
    """Decode + eval geometry of one image -> ``uint8 [H, W, C]`` (no
    normalisation; `eval_preprocess` is the whole transform).

    `s` is an `EvalSettings` (or the pipeline's internal settings, which have
    the same eval fields). Raises `decode.DecodeError` if the image cannot be
    decoded.
    """
    img = decode_lib.open_image(data)
    if s.eval_crop == "center_crop":
        img = augment.resize_center_crop(
            img, s.size, s.crop_ratio, channels=s.channels, interpolation=s.interpolation, use_draft=s.eval_jpeg_draft
        )
    else:
        img = augment.resize(decode_lib.load(img, s.channels), s.size, s.interpolation)
    return decode_lib.to_array(img, s.channels)


class _TrainExample(grain.transforms.RandomMap):
    """Source index -> augmented example; undecodable images and unreadable
    records are replaced by random other examples, up to `max_retries` in a
    row, then `sources.DataIntegrityError`."""

    def __init__(self, source, settings: ImageSettings, max_retries: int, return_index: bool):
        self._source = source
        self._s = settings
        self._max_retries = max_retries
        self._return_index = return_index

    def random_map(self, index, rng: np.random.Generator):
        bad = unreadable = 0
        errors = []
        while True:
            try:
                record = self._source[index]
                image = train_image(record["image"], rng, self._s)
                break
            except sources.RecordReadError as e:
                unreadable += 1
                errors.append(e)
                last = e
            except decode_lib.DecodeError as e:
                errors.append(f"example {index} of the train split: undecodable image ({e})")
                last = e
            bad += 1
            if bad > self._max_retries:
                raise _too_many_bad(errors, self._max_retries) from last
            new_index = int(rng.integers(0, len(self._source)))
            if isinstance(last, sources.RecordReadError):
                log.warning(
                    "Skipped an unreadable train record, using example %d "
                    "instead (counted in data_stats() 'train_skipped' and "
                    "'train_unreadable'): %s: ArrayRecord: %s. `%s` lists "
                    "every damaged record.",
                    new_index,
                    last.where,
                    last.detail,
                    last.check,
                )
            index = new_index
        out = {
            "image": image,
            "label": np.int32(record["label"]),
            "_bad": np.int32(bad),
            "_unreadable": np.int32(unreadable),
        }
        if self._return_index:
            out["index"] = np.int32(index)
        return out


def _too_many_bad(errors: list, max_retries: int) -> sources.DataIntegrityError:
    """The error that stops training after too many bad records in a row."""
    parts, fix = [], ""
    for e in errors:
        if isinstance(e, sources.RecordReadError):
            parts.append(f"{e.where}: cannot be read (ArrayRecord: {e.detail})")
            fix = e.fix
        else:
            parts.append(str(e))
    allowed = f"config.data.max_decode_retries={max_retries} replacement{'' if max_retries == 1 else 's'} allowed"
    fix = fix or ("Check the data set's images, or raise config.data.max_decode_retries.")
    return sources.DataIntegrityError(
        f"Training stopped: {len(errors)} train "
        f"record{'' if len(errors) == 1 else 's'} in a row could not be "
        f"used ({allowed}): {'; '.join(parts)}. {fix} Checkpoints already "
        "written are not touched: rerun to resume from the last one once the "
        "data are repaired."
    )


class Normalize:
    """``(x / 255 - mean) / std`` as one multiply-add in float32: ``Normalize(mean, std, channels)(images)``.

    Works on ``[..., W, C]`` viewed as rows of ``W * C`` values with the
    per-channel constants tiled along the row: numpy then runs long
    contiguous inner loops (about 5x faster than broadcasting over ``C``).
    """

    def __init__(self, mean, std, channels: int):
        mean = config_lib.channel_vector(mean, channels)
        std = config_lib.channel_vector(std, channels)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-mean / std).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        width, channels = images.shape[-2:]
        out = images.astype(np.float32)
        rows = out.reshape(-1, width * channels)
        rows *= np.tile(self.scale, width)
        rows += np.tile(self.offset, width)
        return out


_EVAL_CROPS = ("center_crop", "resize")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The eval transform of a data config, in one value (see `eval_settings`).

    Fields (data-config names in brackets where they differ): ``size``
    (``image_size``), ``channels`` (3: RGB, 1: luma), ``interpolation``,
    ``eval_crop`` (``'center_crop'`` | ``'resize'``), ``crop_ratio``,
    ``eval_jpeg_draft``, ``mean`` and ``std`` (one float per channel, in
    [0, 1] units). `to_dict` gives them under the data-config names; that
    dict is what a ``.bvit`` file stores as its ``preprocess`` header, and
    `eval_settings` reads it back.
    """

    size: int
    channels: int
    interpolation: str
    eval_crop: str
    crop_ratio: float
    eval_jpeg_draft: bool
    mean: tuple
    std: tuple

    def to_dict(self) -> dict:
        """JSON-ready dict under the data-config field names."""
        return {
            "image_size": self.size,
            "channels": self.channels,
            "interpolation": self.interpolation,
            "eval_crop": self.eval_crop,
            "crop_ratio": self.crop_ratio,
            "eval_jpeg_draft": self.eval_jpeg_draft,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """``uint8 [..., H, W, C]`` -> float32 ``(x / 255 - mean) / std``.

        Computed as ``x * (1 / (255 std)) + (-mean / std)`` with float32
        constants (`Normalize`); elementwise, so one image and a batch holding
        it give the same bits.
        """
        return Normalize(self.mean, self.std, self.channels)(images)


def _per_channel(value, channels: int, what: str) -> tuple:
    v = np.asarray(value, np.float64).reshape(-1)
    if v.size not in (1, channels):
        raise ValueError(f"{what} has {v.size} values for {channels} channels")
    return tuple(float(x) for x in np.broadcast_to(v, (channels,)))


def eval_settings(config) -> EvalSettings:
    """The `EvalSettings` of a data config: the one derivation of the eval
    transform, used by `create_eval_iterator`, by `eval_preprocess` and (as
    ``eval_settings(config.data).to_dict()``) by the ``.bvit`` export header.

    `config`: a data ConfigDict (``default_data_config(...)``, a trainer's
    ``config.data``), a plain dict with the same fields (a workdir's
    ``config.json`` ``data`` entry, or a ``.bvit`` header's ``preprocess``),
    or an `EvalSettings` (returned as is). Reads ``image_size``,
    ``channels``, ``interpolation``, ``eval_crop``, ``crop_ratio``,
    ``eval_jpeg_draft`` (default False), ``mean`` and ``std`` (one value or
    one per channel; stored per channel). Raises ``ValueError`` when a
    required field is missing or a value is not one the pipeline knows.
    """
    if isinstance(config, EvalSettings):
        return config
    missing = [
        k for k in ("image_size", "channels", "interpolation", "eval_crop", "mean", "std") if _field(config, k) is None
    ]
    if missing:
        raise ValueError(f"the data config has no {missing} (needed for the eval transform)")
    channels = int(_field(config, "channels"))
    decode_lib.pil_mode(channels)  # 1 or 3
    eval_crop = str(_field(config, "eval_crop"))
    if eval_crop not in _EVAL_CROPS:
        raise ValueError(f"unknown eval_crop {eval_crop!r} (one of {_EVAL_CROPS})")
    interpolation = str(_field(config, "interpolation"))
    augment.resample(interpolation)  # known name
    crop_ratio = float(_field(config, "crop_ratio", 0.875))
    if eval_crop == "center_crop" and not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return EvalSettings(
        size=int(_field(config, "image_size")),
        channels=channels,
        interpolation=interpolation,
        eval_crop=eval_crop,
        crop_ratio=crop_ratio,
        eval_jpeg_draft=bool(_field(config, "eval_jpeg_draft", False)),
        mean=_per_channel(_field(config, "mean"), channels, "mean"),
        std=_per_channel(_field(config, "std"), channels, "std"),
    )


def eval_preprocess(data, settings) -> np.ndarray:
    """The eval transform of one image -> float32 ``[size, size, channels]``.

    `data`: encoded image bytes (any format PIL reads), a ``uint8`` array
    ``[H, W]`` / ``[H, W, C]`` or a PIL image; `settings`: anything
    `eval_settings` takes (a data config, a ``.bvit`` ``preprocess`` header,
    an `EvalSettings`). Steps:

    1. decode with PIL (format from the bytes); to RGB (``channels=3``;
       grayscale replicated, CMYK converted) or luma L (``channels=1``, PIL's
       ``L = R * 299/1000 + G * 587/1000 + B * 114/1000``); images with alpha
       (RGBA, LA, PA, P with transparency) are first composited on opaque
       black, i.e. ``rgb * a / 255`` (rounded by PIL);
    2. ``eval_crop='center_crop'``: resize the shorter side to
       ``R = floor(size / crop_ratio)`` and the longer to
       ``int(R * long / short)``, crop ``size x size`` at
       ``round((side - size) / 2)`` (one PIL resize of the matching box of the
       original, `augment.center_crop_box`); ``'resize'``: resize to
       ``size x size`` (no-op at that size); with ``interpolation``, and with a
       JPEG DCT-domain downscale first only if ``eval_jpeg_draft``;
    3. ``x = (pixel / 255 - mean) / std`` per channel (`EvalSettings.normalize`).

    `create_eval_iterator` runs exactly this: steps 1-2 (`eval_image`) per
    example and step 3 per batch, so its batches equal ``eval_preprocess`` of
    each image bit for bit; ``python -m bvit_jax.deploy.predict`` calls this
    function with the settings stored in the model file. Raises
    `decode.DecodeError` for data PIL cannot decode.
    """
    s = eval_settings(settings)
    return s.normalize(eval_image(data, s))


class _TrainBatch(grain.transforms.Map):
    """The host end of a train batch: ``uint8`` images, int32 labels, the counts."""

    def map(self, batch):
        out = {
            "image": np.ascontiguousarray(batch["image"], np.uint8),
            "label": np.asarray(batch["label"], np.int32),
            "_bad": batch["_bad"],
            "_unreadable": batch["_unreadable"],
        }
        if "index" in batch:
            out["index"] = batch["index"]
        return out


class _EvalExample(grain.transforms.Map):
    """Position in the process's padded share -> example with mask."""

    def __init__(self, source, start: int, stop: int, settings: EvalSettings, return_index: bool):
        self._source = source
        self._start, self._stop = start, stop
        self._s = settings
        self._return_index = return_index

    def map(self, k):
        index = self._start + int(k)
        shape = (self._s.size, self._s.size, self._s.channels)
        image, label, mask, bad = np.zeros(shape, np.uint8), 0, False, 0
        unreadable = 0
        if index < self._stop:
            try:
                record = self._source[index]
            except sources.RecordReadError as e:
                log.warning(
                    "Masked out an unreadable eval record (counted in "
                    "data_stats() 'eval_undecodable' and 'eval_unreadable'): "
                    "%s: ArrayRecord: %s. `%s` lists every damaged record.",
                    e.where,
                    e.detail,
                    e.check,
                )
                record, bad, unreadable = None, 1, 1
            if record is not None:
                label = record["label"]
                try:
                    image, mask = eval_image(record["image"], self._s), True
                except decode_lib.DecodeError:
                    bad = 1
        out = {
            "image": image,
            "label": np.int32(label),
            "mask": np.bool_(mask),
            "_bad": np.int32(bad),
            "_unreadable": np.int32(unreadable),
        }
        if self._return_index:
            out["index"] = np.int32(index if index < self._stop else -1)
        return out


class _EvalBatch(grain.transforms.Map):
    """Step 3 of `eval_preprocess` on a batch of `eval_image` outputs."""

    def __init__(self, settings: EvalSettings):
        self._s = settings

    def map(self, batch):
        x = self._s.normalize(batch["image"])
        x[~batch["mask"]] = 0.0
        batch["image"] = x
        return batch


# ----------------------------------------------------------------------------
# Iterators.
# ----------------------------------------------------------------------------


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"bad process {process_index} of {process_count}")
    return int(process_index), int(process_count)


def _finish(ds: grain.MapDataset, config, prefix: str) -> grain.DatasetIterator:
    read = grain.ReadOptions(num_threads=int(config.num_threads), prefetch_buffer_size=int(config.prefetch))
    it_ds = ds.to_iter_dataset(read)
    num_workers = config_lib.resolve_num_workers(config.num_workers)
    if num_workers > 0:
        # grain's multiprocessing reads absl flags; outside an absl app (pytest,
        # Colab) they were never parsed: use their defaults.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=int(config.prefetch))
        )
    return iter(it_ds.map(_CountAndStrip(prefix)))


def _num_classes(config, source) -> int:
    if source is None:
        return dataset_info(config).num_classes
    if config.num_classes is None:
        raise ValueError("config.num_classes must be set with a custom source")
    return int(config.num_classes)


def create_train_dataset(
    config,
    local_batch_size: int,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
) -> grain.MapDataset:
    """The batched train ``MapDataset`` (infinite) before the iterator stage.

    Batches still hold the private ``'_bad'`` counts; use
    `create_train_iterator` unless you need random access to batches.
    """
    p, num_p = _process(process_index, process_count)
    num_classes = _num_classes(config, source)
    if source is None:
        source = sources.get_source(config, config.train_split)
    n = len(source)
    if n // num_p < 1:
        raise ValueError(f"{n} train examples cannot be split over {num_p} processes")
    repeats = int(config.repeated_aug)
    if repeats < 1:
        raise ValueError("repeated_aug must be >= 1")
    settings = ImageSettings.from_config(config)
    ds = grain.MapDataset.range(n // num_p).repeat()
    ds = ds.map_with_index(
        _TrainIndex(num_examples=n, seed=_seed32(seed, 0), process_index=p, process_count=num_p, repeats=repeats)
    )
    ds = ds.random_map(
        _TrainExample(source, settings, int(config.max_decode_retries), bool(config.return_index)),
        seed=_seed32(seed, 1, p),
    )
    del num_classes  # checked above; the soft targets are made on device
    ds = ds.batch(int(local_batch_size), drop_remainder=True)
    return ds.map(_TrainBatch())


def create_train_iterator(
    config,
    local_batch_size: int,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
    start_step: int = 0,
) -> grain.DatasetIterator:
    """Infinite iterator of this process's train batches, from batch ``start_step`` on.

    Each batch is the host half of the pipeline: ``image`` ``uint8 [B, H, W,
    C]`` (decoded, cropped, flipped, RandAugment), ``label`` int32 ``[B]``,
    ``index`` int32 ``[B]`` if ``config.return_index``. The rest runs on the
    device, in the jitted step: ``device.DevicePreprocess.from_config(config,
    num_classes, seed)(batch, prep.key(step))`` normalises, erases, mixes and
    makes the soft targets (float32 images, ``label`` float32 ``[B, K]``,
    ``label_index`` int32 ``[B]``).

    The result is a grain ``DatasetIterator``: ``get_state()`` /
    ``set_state()`` (JSON-serialisable dicts) resume the exact sequence, and
    orbax saves it with ``grain.checkpoint.CheckpointSave(it)`` /
    ``grain.checkpoint.CheckpointRestore(it)``. `process_index` /
    `process_count` default to ``jax.process_index()`` / ``process_count()``.
    `source`: optional grain ``RandomAccessDataSource`` of ``{'image': encoded
    bytes or uint8 array, 'label': int}`` records used instead of the config's
    data set (then ``config.num_classes`` must be set).

    Batch ``k`` is a function of the seed, the process index and count, and
    ``k`` alone (a random-access dataset), so ``start_step=k`` yields exactly
    what the iterator yields after ``k`` batches: the trainer's resume on
    another process count (``config.data_resume='from_step'``) starts there.
    """
    ds = create_train_dataset(config, local_batch_size, seed, process_index, process_count, source)
    if start_step:
        ds = ds[int(start_step) :]
    return _finish(ds, config, "train")


def _eval_dataset(config, local_batch_size, process_index, process_count, split, source, normalize):
    p, num_p = _process(process_index, process_count)
    if source is None:
        source = sources.get_source(config, split or config.eval_split)
    start, stop, num_batches = eval_range(len(source), p, num_p, int(local_batch_size))
    settings = eval_settings(config)
    ds = grain.MapDataset.range(num_batches * int(local_batch_size))
    ds = ds.map(_EvalExample(source, start, stop, settings, bool(config.return_index)))
    ds = ds.batch(int(local_batch_size))
    if normalize:
        ds = ds.map(_EvalBatch(settings))
    return ds, num_batches


def create_eval_iterator(
    config,
    local_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str | None = None,
    source=None,
    normalize: bool = True,
) -> grain.DatasetIterator:
    """One pass over `split` (default ``config.eval_split``), this process's share.

    Each batch: ``image`` float32 ``[B, H, W, C]``, each image
    `eval_preprocess` of its record (bit for bit; zeros where masked),
    ``label`` int32 ``[B]``, ``mask`` bool ``[B]`` (False on padding and on
    undecodable images), ``index`` int32 ``[B]`` if ``config.return_index``
    (-1 on padding). Every process yields the same number of batches.
    `source` as in `create_train_iterator`. ``normalize=False``: ``image``
    stays ``uint8`` (`eval_image`, zeros where masked), for
    ``device.DevicePreprocess`` to normalise on the device (the same float
    images, bit for bit); the trainer uses `EvalPasses` for that.
    """
    ds, _ = _eval_dataset(config, local_batch_size, process_index, process_count, split, source, normalize)
    return _finish(ds, config, "eval")


class EvalPasses:
    """One eval iterator for a whole run: ``for batch in passes.one_pass(): ...`` per evaluation.

    The eval dataset of `create_eval_iterator` repeated without end and
    opened once, so its grain worker processes (``config.num_workers``)
    start once per run instead of once per evaluation. Every `one_pass`
    yields the next ``num_batches`` batches, which are the whole share of
    this process once: the same examples, in the same order, each once with
    ``mask == True``, padding masked, every pass. A pass left unfinished
    (an exception in the consumer) is completed, unseen, at the start of the
    next one, so passes stay aligned. Between evaluations the workers fill
    their prefetch buffers with the next pass and then wait. Arguments as
    in `create_eval_iterator` (``normalize=False`` by default: ``uint8``
    images for ``device.DevicePreprocess``).
    """

    def __init__(
        self,
        config,
        local_batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
        split: str | None = None,
        source=None,
        normalize: bool = False,
    ):
        ds, self.num_batches = _eval_dataset(
            config, local_batch_size, process_index, process_count, split, source, normalize
        )
        self._config = config
        self._ds = ds.repeat()
        self._it = None
        self._taken = 0  # batches taken so far, over all passes

    def one_pass(self):
        """Generator of the ``num_batches`` batches of one full pass."""
        if self._it is None:
            self._it = _finish(self._ds, self._config, "eval")
        while self._taken % self.num_batches:  # the rest of an abandoned pass
            next(self._it)
            self._taken += 1
        for _ in range(self.num_batches):
            batch = next(self._it)
            self._taken += 1
            yield batch


def num_eval_batches(config, local_batch_size: int, process_count: int | None = None) -> int:
    """How many batches `create_eval_iterator` yields on every process."""
    if process_count is None:
        import jax

        process_count = jax.process_count()
    n = dataset_info(config).num_eval
    return eval_range(n, 0, int(process_count), int(local_batch_size))[2]


def steps_per_epoch(config, global_batch_size: int) -> int:
    """Train steps per epoch: ``floor(num_train / global_batch_size)``."""
    return max(1, dataset_info(config).num_train // int(global_batch_size))
