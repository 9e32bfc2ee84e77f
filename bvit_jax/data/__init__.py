"""Input pipeline: TFDS / IDX sources, grain iterators, DeiT augmentation.

See docs/data.md. Main entry points::

  from bvit_jax import data
  cfg = data.default_data_config('imagenet2012')
  info = data.dataset_info(cfg)
  it = data.create_train_iterator(cfg, local_batch_size=128, seed=0)
  prep = data.DevicePreprocess.from_config(cfg, num_classes, seed=0)
  batch = prep(next(it), prep.key(step))  # in the jitted step: uint8 -> float
  ev = data.create_eval_iterator(cfg, local_batch_size=128)
  x = data.eval_preprocess(open('img.jpg', 'rb').read(), cfg)  # one image
  names = data.class_names(cfg)
  data.verify_data(cfg)  # every shard exists, opens, holds its records
"""

from bvit_jax.data.config import default_data_config, resolve_num_workers
from bvit_jax.data.counters import data_stats, reset_data_stats
from bvit_jax.data.device import DevicePreprocess
from bvit_jax.data.eval_transform import EvalSettings, eval_preprocess, eval_settings
from bvit_jax.data.metadata import DatasetInfo, class_names, dataset_info
from bvit_jax.data.pipeline import (
    EvalPasses,
    create_eval_iterator,
    create_train_dataset,
    create_train_iterator,
    num_eval_batches,
    steps_per_epoch,
)
from bvit_jax.data.sources import (
    DataIntegrityError,
    DatasetNotPreparedError,
    RecordReadError,
)
from bvit_jax.data.verify import verify_data

__all__ = [
    "DataIntegrityError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "DevicePreprocess",
    "EvalPasses",
    "EvalSettings",
    "RecordReadError",
    "class_names",
    "create_eval_iterator",
    "create_train_dataset",
    "create_train_iterator",
    "data_stats",
    "dataset_info",
    "default_data_config",
    "eval_preprocess",
    "eval_settings",
    "num_eval_batches",
    "reset_data_stats",
    "resolve_num_workers",
    "steps_per_epoch",
    "verify_data",
]
