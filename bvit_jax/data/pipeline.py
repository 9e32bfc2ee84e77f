"""Train and eval iterators: grain ``MapDataset`` pipelines over `sources`.

Train (infinite, per process)::

  local position k --(train_index: epoch shuffle, process stride, repeats)-->
  source index --(decode, crop, flip, RandAugment; skip bad files)--> uint8
  --batch--> normalise, random erasing, Mixup/CutMix, smoothing --> batch

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

Bad images: an undecodable train image is replaced by a random other example
(up to ``max_decode_retries`` tries); an undecodable eval image gets
``mask == False``. Both are counted; `data_stats()` returns the counts as
seen by this process's consumer (also with ``num_workers > 0``: counts travel
inside the batches and are added up when the batch is taken).
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import grain
from grain.experimental import index_shuffle
import numpy as np
from PIL import Image

from bvit_jax.data import augment
from bvit_jax.data import decode as decode_lib
from bvit_jax.data import mixup
from bvit_jax.data import sources


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the schedule need to know about the data."""
  num_classes: int
  image_shape: tuple  # (H, W, C) of the batches
  num_train: int      # examples in config.train_split (all processes)
  num_eval: int       # examples in config.eval_split (all processes)


def dataset_info(config) -> DatasetInfo:
  """`DatasetInfo` for a data config, from metadata only (no images read)."""
  info = sources.source_info(config, [config.train_split, config.eval_split])
  return DatasetInfo(
      num_classes=info.num_classes,
      image_shape=(int(config.image_size), int(config.image_size),
                   int(config.channels)),
      num_train=int(info.num_examples[config.train_split]),
      num_eval=int(info.num_examples[config.eval_split]),
  )


# ----------------------------------------------------------------------------
# Counters.
# ----------------------------------------------------------------------------

_STATS: collections.Counter = collections.Counter()
_STATS_LOCK = threading.Lock()


def data_stats() -> dict[str, int]:
  """Counts so far in this process.

  Keys: ``train_examples`` (examples in train batches taken),
  ``train_skipped`` (undecodable train images replaced by other examples),
  ``eval_examples`` (real eval examples taken, padding excluded),
  ``eval_undecodable`` (eval images masked out because they cannot be
  decoded).
  """
  with _STATS_LOCK:
    out = {k: 0 for k in ("train_examples", "train_skipped", "eval_examples",
                          "eval_undecodable")}
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
    if self._prefix == "train":
      n = len(batch["label_index"])
      update = {"train_examples": n, "train_skipped": bad}
    else:
      n = int(np.sum(batch["mask"]))
      update = {"eval_examples": n, "eval_undecodable": bad}
    with _STATS_LOCK:
      _STATS.update(update)
    return batch


# ----------------------------------------------------------------------------
# Index arithmetic.
# ----------------------------------------------------------------------------


def _seed32(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def train_index(k: int, *, num_examples: int, seed: int, process_index: int,
                process_count: int, repeats: int = 1) -> int:
  """Source index of the `k`-th training example of process `process_index`.

  ``e, j = divmod(k, N // P)``; global position ``g = j * P + p``; source
  index ``perm_e[g // repeats]`` where ``perm_e`` is grain's
  ``index_shuffle`` permutation of ``range(N)`` with seed ``seed + e``.
  """
  n_local = num_examples // process_count
  epoch, j = divmod(int(k), n_local)
  position = (j * process_count + process_index) // repeats
  return int(index_shuffle(position, max_index=num_examples - 1,
                           seed=(seed + epoch) % 2**32, rounds=4))


class _TrainIndex(grain.experimental.MapWithIndexTransform):
  def __init__(self, **kwargs):
    self._kwargs = kwargs

  def map_with_index(self, index: int, element):
    del element
    return train_index(index, **self._kwargs)


def eval_range(num_examples: int, process_index: int, process_count: int,
               batch_size: int) -> tuple[int, int, int]:
  """``(start, stop, num_batches)`` of a process's eval share (see module)."""
  per = -(-num_examples // process_count)
  start = min(process_index * per, num_examples)
  stop = min(start + per, num_examples)
  num_batches = max(1, -(-per // batch_size))
  return start, stop, num_batches


# ----------------------------------------------------------------------------
# Per-example and per-batch transforms (picklable, for grain workers).
# ----------------------------------------------------------------------------


def _as_channel_vector(v, channels: int) -> np.ndarray:
  v = np.asarray(v, np.float32).reshape(-1)
  return np.broadcast_to(v, (channels,)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _ImageSettings:
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
  def from_config(cls, c) -> "_ImageSettings":
    if c.train_crop not in ("random_resized_crop", "pad_random_crop", "resize"):
      raise ValueError(f"unknown train_crop {c.train_crop!r}")
    if c.eval_crop not in ("center_crop", "resize"):
      raise ValueError(f"unknown eval_crop {c.eval_crop!r}")
    fill = tuple(int(round(255 * m)) for m in _as_channel_vector(c.mean, 3))
    ra = (augment.RandAugment.from_string(c.randaugment, fill, c.interpolation)
          if c.randaugment else None)
    return cls(size=int(c.image_size), channels=int(c.channels),
               interpolation=c.interpolation, jpeg_draft=bool(c.jpeg_draft),
               eval_jpeg_draft=bool(c.eval_jpeg_draft),
               train_crop=c.train_crop, rrc_scale=tuple(c.rrc_scale),
               rrc_ratio=tuple(c.rrc_ratio), pad_size=int(c.pad_size),
               flip_prob=float(c.flip_prob), randaugment=ra,
               eval_crop=c.eval_crop, crop_ratio=float(c.crop_ratio))


def train_image(data, rng: np.random.Generator, s: _ImageSettings) -> np.ndarray:
  """Decode + train augmentation of one image -> ``uint8 [H, W, C]``.

  Raises `decode.DecodeError` if the image cannot be decoded.
  """
  img = decode_lib.open_image(data)
  if s.train_crop == "random_resized_crop":
    img = augment.random_resized_crop(
        img, s.size, rng, scale=s.rrc_scale, ratio=s.rrc_ratio,
        channels=s.channels, interpolation=s.interpolation,
        use_draft=s.jpeg_draft)
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


def eval_image(data, s: _ImageSettings) -> np.ndarray:
  """Decode + eval transform of one image -> ``uint8 [H, W, C]``."""
  img = decode_lib.open_image(data)
  if s.eval_crop == "center_crop":
    img = augment.resize_center_crop(
        img, s.size, s.crop_ratio, channels=s.channels,
        interpolation=s.interpolation, use_draft=s.eval_jpeg_draft)
  else:
    img = augment.resize(decode_lib.load(img, s.channels), s.size,
                         s.interpolation)
  return decode_lib.to_array(img, s.channels)


class _TrainExample(grain.transforms.RandomMap):
  """Source index -> augmented example; undecodable images are replaced."""

  def __init__(self, source, settings: _ImageSettings, max_retries: int,
               return_index: bool):
    self._source = source
    self._s = settings
    self._max_retries = max_retries
    self._return_index = return_index

  def random_map(self, index, rng: np.random.Generator):
    bad = 0
    errors = []
    while True:
      record = self._source[index]
      try:
        image = train_image(record["image"], rng, self._s)
        break
      except decode_lib.DecodeError as e:
        bad += 1
        errors.append(f"{index}: {e}")
        if bad > self._max_retries:
          raise RuntimeError(
              f"{bad} undecodable images in a row: {errors}") from e
        index = int(rng.integers(0, len(self._source)))
    out = {"image": image, "label": np.int32(record["label"]),
           "_bad": np.int32(bad)}
    if self._return_index:
      out["index"] = np.int32(index)
    return out


class _Normalize:
  """``(x / 255 - mean) / std`` as one multiply-add in float32.

  Works on ``[..., W, C]`` viewed as rows of ``W * C`` values with the
  per-channel constants tiled along the row: numpy then runs long
  contiguous inner loops (about 5x faster than broadcasting over ``C``).
  """

  def __init__(self, mean, std, channels: int):
    mean = _as_channel_vector(mean, channels)
    std = _as_channel_vector(std, channels)
    self.scale = (1.0 / (255.0 * std)).astype(np.float32)
    self.offset = (-mean / std).astype(np.float32)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    width, channels = images.shape[-2:]
    out = images.astype(np.float32)
    rows = out.reshape(-1, width * channels)
    rows *= np.tile(self.scale, width)
    rows += np.tile(self.offset, width)
    return out


class _TrainBatch(grain.transforms.RandomMap):
  """Normalise, random erasing, Mixup / CutMix and label smoothing."""

  def __init__(self, config, num_classes: int):
    self._norm = _Normalize(config.mean, config.std, config.channels)
    self._erase = float(config.random_erase_prob)
    self._mix = dict(num_classes=num_classes,
                     mixup_alpha=float(config.mixup_alpha),
                     cutmix_alpha=float(config.cutmix_alpha),
                     mix_prob=float(config.mix_prob),
                     switch_prob=float(config.mix_switch_prob),
                     smoothing=float(config.label_smoothing))

  def random_map(self, batch, rng: np.random.Generator):
    x = self._norm(batch["image"])
    if self._erase > 0:
      for i in range(len(x)):
        augment.random_erasing(x[i], rng, self._erase)
    x, soft, hard = mixup.mix_batch(x, batch["label"], rng, **self._mix)
    out = {"image": np.ascontiguousarray(x, np.float32), "label": soft,
           "label_index": np.asarray(hard, np.int32), "_bad": batch["_bad"]}
    if "index" in batch:
      out["index"] = batch["index"]
    return out


class _EvalExample(grain.transforms.Map):
  """Position in the process's padded share -> example with mask."""

  def __init__(self, source, start: int, stop: int, settings: _ImageSettings,
               return_index: bool):
    self._source = source
    self._start, self._stop = start, stop
    self._s = settings
    self._return_index = return_index

  def map(self, k):
    index = self._start + int(k)
    shape = (self._s.size, self._s.size, self._s.channels)
    image, label, mask, bad = np.zeros(shape, np.uint8), 0, False, 0
    if index < self._stop:
      record = self._source[index]
      label = record["label"]
      try:
        image, mask = eval_image(record["image"], self._s), True
      except decode_lib.DecodeError:
        bad = 1
    out = {"image": image, "label": np.int32(label), "mask": np.bool_(mask),
           "_bad": np.int32(bad)}
    if self._return_index:
      out["index"] = np.int32(index if index < self._stop else -1)
    return out


class _EvalBatch(grain.transforms.Map):
  def __init__(self, config):
    self._norm = _Normalize(config.mean, config.std, config.channels)

  def map(self, batch):
    x = self._norm(batch["image"])
    x[~batch["mask"]] = 0.0
    batch["image"] = x
    return batch


# ----------------------------------------------------------------------------
# Iterators.
# ----------------------------------------------------------------------------


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"bad process {process_index} of {process_count}")
  return int(process_index), int(process_count)


def _finish(ds: grain.MapDataset, config, prefix: str) -> grain.DatasetIterator:
  read = grain.ReadOptions(num_threads=int(config.num_threads),
                           prefetch_buffer_size=int(config.prefetch))
  it_ds = ds.to_iter_dataset(read)
  if int(config.num_workers) > 0:
    # grain's multiprocessing reads absl flags; outside an absl app (pytest,
    # Colab) they were never parsed: use their defaults.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.num_workers),
        per_worker_buffer_size=int(config.prefetch)))
  return iter(it_ds.map(_CountAndStrip(prefix)))


def _num_classes(config, source) -> int:
  if source is None:
    return dataset_info(config).num_classes
  if config.num_classes is None:
    raise ValueError("config.num_classes must be set with a custom source")
  return int(config.num_classes)


def create_train_dataset(config, local_batch_size: int, seed: int = 0,
                         process_index: int | None = None,
                         process_count: int | None = None,
                         source=None) -> grain.MapDataset:
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
  settings = _ImageSettings.from_config(config)
  ds = grain.MapDataset.range(n // num_p).repeat()
  ds = ds.map_with_index(_TrainIndex(
      num_examples=n, seed=_seed32(seed, 0), process_index=p,
      process_count=num_p, repeats=repeats))
  ds = ds.random_map(
      _TrainExample(source, settings, int(config.max_decode_retries),
                    bool(config.return_index)),
      seed=_seed32(seed, 1, p))
  ds = ds.batch(int(local_batch_size), drop_remainder=True)
  return ds.random_map(_TrainBatch(config, num_classes), seed=_seed32(seed, 2, p))


def create_train_iterator(config, local_batch_size: int, seed: int = 0,
                          process_index: int | None = None,
                          process_count: int | None = None,
                          source=None) -> grain.DatasetIterator:
  """Infinite iterator of this process's train batches.

  Each batch: ``image`` float32 ``[B, H, W, C]`` normalised; ``label``
  float32 ``[B, K]`` soft targets (smoothing / Mixup / CutMix, rows sum to
  1); ``label_index`` int32 ``[B]`` (hard label, the dominant one for mixed
  batches); ``index`` int32 ``[B]`` if ``config.return_index``.

  The result is a grain ``DatasetIterator``: ``get_state()`` /
  ``set_state()`` (JSON-serialisable dicts) resume the exact sequence, and
  orbax saves it with ``grain.checkpoint.CheckpointSave(it)`` /
  ``grain.checkpoint.CheckpointRestore(it)``. `process_index` /
  `process_count` default to ``jax.process_index()`` / ``process_count()``.
  `source`: optional grain ``RandomAccessDataSource`` of ``{'image': encoded
  bytes or uint8 array, 'label': int}`` records used instead of the config's
  data set (then ``config.num_classes`` must be set).
  """
  ds = create_train_dataset(config, local_batch_size, seed, process_index,
                            process_count, source)
  return _finish(ds, config, "train")


def create_eval_iterator(config, local_batch_size: int,
                         process_index: int | None = None,
                         process_count: int | None = None,
                         split: str | None = None,
                         source=None) -> grain.DatasetIterator:
  """One pass over `split` (default ``config.eval_split``), this process's share.

  Each batch: ``image`` float32 ``[B, H, W, C]`` (zeros where masked),
  ``label`` int32 ``[B]``, ``mask`` bool ``[B]`` (False on padding and on
  undecodable images), ``index`` int32 ``[B]`` if ``config.return_index``
  (-1 on padding). Every process yields the same number of batches.
  `source` as in `create_train_iterator`.
  """
  p, num_p = _process(process_index, process_count)
  if source is None:
    source = sources.get_source(config, split or config.eval_split)
  start, stop, num_batches = eval_range(len(source), p, num_p,
                                        int(local_batch_size))
  settings = _ImageSettings.from_config(config)
  ds = grain.MapDataset.range(num_batches * int(local_batch_size))
  ds = ds.map(_EvalExample(source, start, stop, settings,
                           bool(config.return_index)))
  ds = ds.batch(int(local_batch_size)).map(_EvalBatch(config))
  return _finish(ds, config, "eval")


def num_eval_batches(config, local_batch_size: int,
                     process_count: int | None = None) -> int:
  """How many batches `create_eval_iterator` yields on every process."""
  if process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_count = jax.process_count()
  n = dataset_info(config).num_eval
  return eval_range(n, 0, int(process_count), int(local_batch_size))[2]


def steps_per_epoch(config, global_batch_size: int) -> int:
  """Train steps per epoch: ``floor(num_train / global_batch_size)``."""
  return max(1, dataset_info(config).num_train // int(global_batch_size))

