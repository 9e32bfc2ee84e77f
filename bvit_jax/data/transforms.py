"""The grain transforms of the iterators: per-example and per-batch maps (picklable, for grain workers).

Train: `ImageSettings` and `train_image` (decode, crop, flip, RandAugment of
one image), `TrainExample` (source index -> ``uint8`` example) and
`TrainBatch`. Eval: `EvalExample` (position in the process's padded share ->
`eval_transform.eval_image` of the record, with its mask) and `EvalBatch`
(the per-batch normalisation of `eval_transform.eval_preprocess`).

Bad images: an undecodable train image is replaced by a random other example
(up to ``max_decode_retries`` tries in a row, then `DataIntegrityError`); an
undecodable eval image gets ``mask == False``. A record that cannot be read
at all (`sources.RecordReadError`: a damaged chunk inside a shard whose
footer is intact) is treated the same way and also counted as unreadable.
Each example carries its counts (``'_bad'``, ``'_unreadable'``) for
`counters.data_stats`.
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np
from PIL import Image

from bvit_jax.data import augment, sources
from bvit_jax.data import config as config_lib
from bvit_jax.data import decode as decode_lib
from bvit_jax.data.eval_transform import EvalSettings, eval_image

log = logging.getLogger(__name__)


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


class TrainExample(grain.transforms.RandomMap):
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


class TrainBatch(grain.transforms.Map):
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


class EvalExample(grain.transforms.Map):
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


class EvalBatch(grain.transforms.Map):
    """Step 3 of `eval_preprocess` on a batch of `eval_image` outputs."""

    def __init__(self, settings: EvalSettings):
        self._s = settings

    def map(self, batch):
        x = self._s.normalize(batch["image"])
        x[~batch["mask"]] = 0.0
        batch["image"] = x
        return batch
