r"""Builds a TFDS data set as ArrayRecord, once, before training.

ImageNet (the two official tars must be in the manual dir; nothing is
downloaded)::

  python -m bvit_jax.data.prepare --dataset=imagenet2012 \
      --manual_dir=/data/imagenet_tars --data_dir=/data/tfds

This runs TFDS's own ``imagenet2012`` builder (TFDS 4.9: version 5.1.0) with
``file_format='array_record'``; building needs TensorFlow
(``pip install tensorflow-cpu``), reading it later does not. Other TFDS names
(``cifar10``, ``imagenette``, ...) are downloaded by TFDS when the machine
has internet. Fashion-MNIST / MNIST need no preparation: the pipeline reads
the IDX files directly (``source='idx'``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tarfile

# Files TFDS builders read from their manual dir, with the official sizes
# in bytes (a smaller file is most likely an interrupted download).
MANUAL_FILES = {
    "imagenet2012": {
        "ILSVRC2012_img_train.tar": 147_897_477_120,
        "ILSVRC2012_img_val.tar": 6_744_924_160,
    },
}
MANUAL_SOURCES = {
    "imagenet2012": "https://image-net.org/download-images (free account; "
                    "'Training images (Task 1 & 2)' and 'Validation images "
                    "(all tasks)' of ILSVRC2012)",
}


class ManualDirError(FileNotFoundError):
  """The manual dir lacks files a builder needs."""


def check_manual_dir(name: str, manual_dir: str | None) -> list[str]:
  """Checks that `manual_dir` holds what the TFDS builder `name` reads.

  Returns the paths of the required files. Raises `ManualDirError` naming
  every missing or unreadable file and where it must go. A file smaller than
  the official one only logs a warning (tests use tiny stand-ins).
  """
  required = MANUAL_FILES.get(name)
  if required is None:
    return []
  where = manual_dir or "<--manual_dir not given>"
  problems, paths = [], []
  for fname, official_size in required.items():
    path = os.path.join(where, fname)
    paths.append(path)
    if not manual_dir or not os.path.isfile(path):
      problems.append(f"  missing: {path}")
    elif not tarfile.is_tarfile(path):
      problems.append(f"  not a tar archive (incomplete download?): {path}")
    elif os.path.getsize(path) < official_size:
      logging.warning("%s is %d bytes, the official file has %d: "
                      "incomplete download?", path, os.path.getsize(path),
                      official_size)
  if problems:
    files = ", ".join(required)
    raise ManualDirError(
        f"TFDS '{name}' is built from files you download yourself: {files}.\n"
        f"Put them, as downloaded (do not extract), into the manual dir "
        f"{where}:\n" + "\n".join(problems) + "\n"
        f"Get them from {MANUAL_SOURCES.get(name, 'the dataset homepage')}, "
        f"then run:\n  python -m bvit_jax.data.prepare --dataset={name} "
        f"--manual_dir={where} --data_dir=<tfds data dir>")
  return paths


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None,
            file_format: str = "array_record"):
  """Builds TFDS data set `name` into `data_dir`; returns the builder.

  A no-op when the build already exists. ``tfds.builder(name, data_dir,
  file_format=...).download_and_prepare(download_config=
  tfds.download.DownloadConfig(manual_dir=...))``.
  """
  check_manual_dir(name, manual_dir)
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(
        "Building TFDS data sets needs TensorFlow: pip install tensorflow-cpu "
        "(only for this prepare step; reading does not need it).") from e
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=download_config)
  return builder


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m bvit_jax.data.prepare",
      description="Build a TFDS data set as ArrayRecord for bvit_jax.")
  parser.add_argument("--dataset", required=True,
                      help="TFDS name, e.g. imagenet2012, cifar10")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: TFDS's, "
                           "~/tensorflow_datasets or $TFDS_DATA_DIR)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder with manually downloaded files "
                           "(imagenet2012: the two ILSVRC2012 tars)")
  parser.add_argument("--file_format", default="array_record",
                      help="array_record (random access, needed by grain)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    builder = prepare(args.dataset, args.data_dir, args.manual_dir,
                      args.file_format)
  except ManualDirError as e:
    print(str(e), file=sys.stderr)
    return 2
  print(f"Prepared {args.dataset} in {builder.data_dir}:")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} examples")
  return 0


if __name__ == "__main__":
  sys.exit(main())
