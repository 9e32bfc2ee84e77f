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

``--rebuild`` deletes an existing (damaged) build and builds it again.
``--verify`` builds nothing: it checks that every shard of the build exists,
opens (ArrayRecord footer and index only) and holds the records
``dataset_info.json`` promises, e.g. on each host of a pod before training::

  python -m bvit_jax.data.prepare --verify --dataset=imagenet2012 \
      --data_dir=/data/tfds [--splits=train,validation] [--full]

It exits with status 0 and a summary, or 1 and a message naming every bad
file and the command that repairs it (``--full`` also reads every record).
"""

from __future__ import annotations

import logging
import os
import sys
import tarfile

from bvit_jax import cli
from bvit_jax.data.config import MANUAL_FILES
from bvit_jax.errors import MissingExtraError, UserError

MANUAL_SOURCES = {
    "imagenet2012": "https://image-net.org/download-images (free account; "
    "'Training images (Task 1 & 2)' and 'Validation images "
    "(all tasks)' of ILSVRC2012)",
}


class ManualDirError(UserError, FileNotFoundError):
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
            logging.warning(
                "%s is %d bytes, the official file has %d: incomplete download?",
                path,
                os.path.getsize(path),
                official_size,
            )
    if problems:
        files = ", ".join(required)
        raise ManualDirError(
            f"TFDS '{name}' is built from files you download yourself: {files}.\n"
            f"Put them, as downloaded (do not extract), into the manual dir "
            f"{where}:\n" + "\n".join(problems) + "\n"
            f"Get them from {MANUAL_SOURCES.get(name, 'the dataset homepage')}, "
            f"then run:\n  python -m bvit_jax.data.prepare --dataset={name} "
            f"--manual_dir={where} --data_dir=<tfds data dir>"
        )
    return paths


def prepare(
    name: str,
    data_dir: str | None,
    manual_dir: str | None = None,
    file_format: str = "array_record",
    rebuild: bool = False,
):
    """Builds TFDS data set `name` into `data_dir`; returns the builder.

    A no-op when the build already exists, unless `rebuild`: then TFDS
    deletes the existing build and generates it again (downloads are reused).
    ``tfds.builder(name, data_dir, file_format=...).download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=...))``.
    """
    check_manual_dir(name, manual_dir)
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:  # only this step needs it; reading does not
        raise MissingExtraError(f"building the TFDS data set {name}", "prepare", e) from None
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if rebuild
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
    builder.download_and_prepare(download_config=download_config)
    return builder


def _define_flags(fv, argv):
    del argv
    from absl import flags

    flags.DEFINE_string("dataset", None, "TFDS name, e.g. imagenet2012, cifar10.", flag_values=fv)
    flags.DEFINE_string(
        "data_dir", None, "TFDS data dir (default: TFDS's, ~/tensorflow_datasets or $TFDS_DATA_DIR).", flag_values=fv
    )
    flags.DEFINE_string(
        "manual_dir",
        None,
        "Folder with manually downloaded files (imagenet2012: the two ILSVRC2012 tars).",
        flag_values=fv,
    )
    flags.DEFINE_string("file_format", "array_record", "array_record (random access, needed by grain).", flag_values=fv)
    flags.DEFINE_bool("rebuild", False, "Delete an existing build and build it again.", flag_values=fv)
    flags.DEFINE_bool(
        "verify",
        False,
        "Build nothing; check that every shard "
        "exists, opens and holds the records dataset_info.json "
        "promises (exit status 1 if not).",
        flag_values=fv,
    )
    flags.DEFINE_list("splits", None, "With --verify: split specs (default: every split of the build).", flag_values=fv)
    flags.DEFINE_bool(
        "full",
        False,
        "With --verify: also read every record (finds damaged chunks; a full read of the data).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "idx_dir", None, "With --verify, for fashion_mnist / mnist: the folder of the IDX files.", flag_values=fv
    )
    flags.mark_flag_as_required("dataset", flag_values=fv)


def _run(fv, args) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; bvit-prepare takes only flags")
    f = {name: fv[name].value for name in fv}
    if f["verify"]:
        return _verify(f)
    builder = prepare(f["dataset"], f["data_dir"], f["manual_dir"], f["file_format"], rebuild=f["rebuild"])
    print(f"Prepared {f['dataset']} in {builder.data_dir}:")
    for split, info in builder.info.splits.items():
        print(f"  {split}: {info.num_examples} examples")
    return 0


def _verify(f) -> int:
    """``--verify``: check the build (or IDX files) of ``--dataset``."""
    from bvit_jax.data import config as config_lib
    from bvit_jax.data import (
        sources,
        verify,
    )

    c = config_lib.default_data_config(f["dataset"])
    c.data_dir = f["data_dir"]
    c.manual_dir = f["manual_dir"]
    if f["idx_dir"]:
        c.idx_dir = f["idx_dir"]
    splits = f["splits"] or None
    if splits is None and c.source == "idx":
        splits = list(sources.IDX_FILES)
    if c.source == "idx":
        checked = verify.verify_data(c, splits)
        where = c.idx_dir
    else:
        checked = verify.verify_tfds(c.name, c.data_dir, splits, manual_dir=c.manual_dir, full=f["full"])
        where = os.fspath(sources.tfds_builder(c.name, c.data_dir).data_dir)
    what = "every record read" if f["full"] else "footer and index checked"
    print(f"Verified {f['dataset']} in {where} ({what}):")
    for s in checked:
        print(f"  {s.split}: {s.files} file{'' if s.files == 1 else 's'}, {s.records} records")
    return 0


main = cli.command(
    "bvit-prepare",
    """Build a TFDS data set as ArrayRecord for bvit_jax, or verify a build.

    bvit-prepare --dataset=imagenet2012 --manual_dir=<tars> --data_dir=<tfds dir>
    bvit-prepare --verify --dataset=imagenet2012 --data_dir=<tfds dir> [--full]""",
    _define_flags,
    _run,
)


if __name__ == "__main__":
    sys.exit(main())
