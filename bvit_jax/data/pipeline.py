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

Eval (finite, one pass): each process reads its contiguous share of the
split, padded so that all processes yield the same number of batches, each
example exactly once with ``mask == True``; each image is
`eval_transform.eval_preprocess` of its record.

The parts, one module each: `indexing` (which example each position reads:
shuffling, sharding, the eval shares), `transforms` (the per-example and
per-batch maps, bad images), `eval_transform` (the eval transform of one
image), `counters` (`data_stats`), `metadata` (`dataset_info`). Here: the
iterators, and `num_eval_batches` / `steps_per_epoch`, the counts they yield.
"""

from __future__ import annotations

import grain

from bvit_jax.data import config as config_lib
from bvit_jax.data import sources
from bvit_jax.data.counters import CountAndStrip
from bvit_jax.data.eval_transform import eval_settings
from bvit_jax.data.indexing import TrainIndex, eval_range, seed32
from bvit_jax.data.metadata import dataset_info
from bvit_jax.data.transforms import EvalBatch, EvalExample, ImageSettings, TrainBatch, TrainExample


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
    return iter(it_ds.map(CountAndStrip(prefix)))


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
        TrainIndex(num_examples=n, seed=seed32(seed, 0), process_index=p, process_count=num_p, repeats=repeats)
    )
    ds = ds.random_map(
        TrainExample(source, settings, int(config.max_decode_retries), bool(config.return_index)),
        seed=seed32(seed, 1, p),
    )
    del num_classes  # checked above; the soft targets are made on device
    ds = ds.batch(int(local_batch_size), drop_remainder=True)
    return ds.map(TrainBatch())


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
    ds = ds.map(EvalExample(source, start, stop, settings, bool(config.return_index)))
    ds = ds.batch(int(local_batch_size))
    if normalize:
        ds = ds.map(EvalBatch(settings))
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
