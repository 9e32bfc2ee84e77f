r"""Checks prepared data before a run reads it, cheaply.

A TFDS ArrayRecord build is a folder ``<data_dir>/<name>/<version>/`` with
``dataset_info.json`` and, per split, shard files named by its
``filepathTemplate`` (``imagenet2012-train.array_record-00000-of-01024``);
``splits[].shardLengths`` says how many records each shard holds. For every
shard of the splits a run reads, `verify_data` checks that the file exists,
that ArrayRecord opens it (which reads the footer and the record index at the
end of the file, about 100 KB per shard of 1250 ImageNet images, and fails
on a truncated file) and that it holds the promised number of records. IDX
files (Fashion-MNIST, MNIST) are checked for existence and size (header, and
the size field of a gzip trailer). Problems raise
`sources.DataIntegrityError`, one paragraph naming the data set, split, file,
what is wrong and the command that repairs the data.

The same check from the command line (exit status 2 on a problem)::

  python -m bvit_jax.data.prepare --verify --dataset=imagenet2012 \
      --data_dir=/data/tfds

``full=True`` (``--full``) also reads every record, to find damaged chunks
inside shards whose footer is intact (a full read of the data).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from bvit_jax.data import sources
from bvit_jax.data.config import MANUAL_FILES
from bvit_jax.data.sources import DataIntegrityError, RecordReadError
from bvit_jax.errors import ConfigError

# Open the footer and index only: no read-ahead, no 1 MB footer prefetch.
_FOOTER_ONLY = "readahead_buffer_size:0,max_parallelism:0,footer_prefetch_bytes:0"
_MAX_LISTED = 10  # problems spelled out in one message
_MAX_THREADS = 16  # shards opened in parallel (network file systems)
_FULL_READ_BLOCK = 256  # records per read with ``full=True``

# Debian packages that install the IDX files of the default idx dirs.
_IDX_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}


@dataclasses.dataclass(frozen=True)
class ShardProblem:
    """What is wrong with one file of a split.

    ``kind``: ``'missing'``, ``'unreadable'`` (truncated or not a file of its
    format), ``'count'`` (holds `found` records, `expected` promised),
    ``'damaged'`` (opens, but the records at `positions` cannot be read;
    only found with ``full=True``), ``'size'`` (an IDX file of the wrong
    size).
    """

    split: str
    path: str
    kind: str
    expected: int | None = None
    found: int | None = None
    detail: str = ""
    positions: tuple = ()
    what: str = "shard file"  # or 'IDX file'

    def describe(self) -> str:
        """The problem as words, e.g. ``shard file X is missing``."""
        what = self.what
        if self.kind == "missing":
            return f"{what} {self.path} is missing"
        if self.kind == "unreadable":
            return f"{what} {self.path} is truncated or unreadable ({self.found} bytes; {self.detail})"
        if self.kind == "count":
            return f"{what} {self.path} holds {self.found} records, dataset_info.json promises {self.expected}"
        if self.kind == "damaged":
            shown = ", ".join(str(p) for p in self.positions[:10])
            more = ", ..." if len(self.positions) > 10 else ""
            return (
                f"{what} {self.path} has {len(self.positions)} unreadable "
                f"record(s) of {self.expected} (positions {shown}{more}; "
                f"{self.detail})"
            )
        if self.kind == "size":
            return f"{what} {self.path} is truncated or damaged ({self.detail})"
        return f"{what} {self.path}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class CheckedSplit:
    """A split that passed the check."""

    split: str
    files: int  # shard files (TFDS) or IDX files
    records: int  # examples in the split


def _reader(path: str, options: str):
    from array_record.python import array_record_module

    return array_record_module.ArrayRecordReader(path, options)


def _reader_status(reader) -> str:
    """ArrayRecord's error of a reader that failed to open (``ok()`` False)."""
    try:
        reader.read([0])  # a failed reader only reports its status, no I/O
    except (RuntimeError, ValueError, IndexError) as e:
        return f"ArrayRecord: {e}"
    return "ArrayRecord could not open it"


def _close(reader) -> None:
    try:
        reader.close()
    except RuntimeError:  # a reader that failed to open reports it again here
        pass


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def check_shard(split: str, path: str, expected: int, full: bool = False) -> tuple[ShardProblem | None, int]:
    """Checks one ArrayRecord shard; returns ``(problem or None, records)``.

    Opens the file with ArrayRecord's reader, which reads only the footer and
    the record index (no read-ahead); a missing, truncated or foreign file
    fails there. Then compares the number of records with `expected`
    (``dataset_info.json``). With `full`, also reads every record and reports
    the positions that cannot be read.
    """
    from etils import epath

    if not epath.Path(path).exists():
        return ShardProblem(split, path, "missing", expected), 0
    try:
        reader = _reader(os.fspath(path), _FOOTER_ONLY)
    except (RuntimeError, ValueError) as e:
        return ShardProblem(split, path, "unreadable", expected, _size(path), f"ArrayRecord: {e}"), 0
    try:
        if not reader.ok():
            return ShardProblem(split, path, "unreadable", expected, _size(path), _reader_status(reader)), 0
        n = int(reader.num_records())
    finally:
        _close(reader)
    if n != expected:
        return ShardProblem(split, path, "count", expected, n), n
    if full:
        bad, detail = _unreadable_records(path, n)
        if bad:
            return ShardProblem(split, path, "damaged", n, n - len(bad), detail, tuple(bad)), n
    return None, n


def _unreadable_records(path: str, n: int) -> tuple[list[int], str]:
    """Positions of the records of `path` that cannot be read (a full read)."""
    reader = _reader(os.fspath(path), "")
    bad, detail = [], ""
    try:
        for start in range(0, n, _FULL_READ_BLOCK):
            stop = min(n, start + _FULL_READ_BLOCK)
            try:
                reader.read(start, stop)
                continue
            except RuntimeError:
                pass
            for i in range(start, stop):  # find the bad ones in this block
                try:
                    reader.read([i])
                except RuntimeError as e:
                    bad.append(i)
                    detail = detail or f"ArrayRecord: {e}"
    finally:
        _close(reader)
    return bad, detail


def _split_names(spec: str, sizes: dict[str, int]) -> list[str]:
    """Underlying split names of a TFDS split spec: ``'train[:90%]+test'`` -> train, test.

    The grammar is ``name[slice]`` terms joined by ``+``; only the names are
    needed (every shard of a sliced split is checked), so no sizes are resolved.
    Unknown names are an error that lists the known ones (``sizes``' keys).
    """
    names = []
    for term in spec.split("+"):
        name = term.split("[", 1)[0].strip()
        if name not in sizes:
            raise ConfigError(
                f"unknown split {name!r} in {spec!r} (config.data.train_split / eval_split); known: {sorted(sizes)}"
            )
        if name not in names:
            names.append(name)
    return names


def prepare_command(
    name: str, data_dir: str, manual_dir: str | None = None, rebuild: bool = False, verify: bool = False
) -> str:
    """The ``python -m bvit_jax.data.prepare`` command line for a data set."""
    cmd = "python -m bvit_jax.data.prepare"
    if verify:
        return f"{cmd} --verify --dataset={name} --data_dir={data_dir}"
    cmd += f" --dataset={name}"
    if name in MANUAL_FILES:
        files = " and ".join(MANUAL_FILES[name])
        cmd += f" --manual_dir={manual_dir or f'<folder with {files}>'}"
    cmd += f" --data_dir={data_dir}"
    return cmd + (" --rebuild" if rebuild else "")


def _tfds_fix(name: str, data_root: str, manual_dir: str | None, damaged: bool = False) -> str:
    rebuild = prepare_command(name, data_root, manual_dir, rebuild=True)
    check = prepare_command(name, data_root, verify=True)
    if damaged:
        check += " --full"
    return (
        f"If these files were copied from a complete build, copy them "
        f"again and check the copy with `{check}`; otherwise rebuild the "
        f"data set with `{rebuild}` (it deletes the broken build first)."
    )


def _listing(problems: Sequence[ShardProblem]) -> str:
    parts = [f"split {p.split!r}: {p.describe()}" for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        parts.append(f"and {len(problems) - _MAX_LISTED} more files with problems")
    return "; ".join(parts)


def integrity_error(
    name: str, data_root: str, problems: Sequence[ShardProblem], manual_dir: str | None = None
) -> DataIntegrityError:
    """The `DataIntegrityError` for problems found in a TFDS build."""
    damaged = any(p.kind == "damaged" for p in problems)
    message = (
        f"The prepared data set {name!r} in {data_root} is incomplete "
        f"or damaged: {_listing(problems)}. " + _tfds_fix(name, data_root, manual_dir, damaged)
    )
    return DataIntegrityError(message, problems)


def record_read_error(
    name: str,
    data_root: str,
    spec: str,
    index: int,
    located: tuple[Any, int] | None,
    detail: str,
    manual_dir: str | None = None,
) -> RecordReadError:
    """The `RecordReadError` for example `index` of split spec `spec`."""
    if located is not None:
        shard, position = located
        where = (
            f"data set {name!r} in {data_root}, split {shard.split!r}, "
            f"shard file {shard.path}, record {position} "
            f"(example {index} of {spec!r})"
        )
    else:
        where = f"data set {name!r} in {data_root}, example {index} of {spec!r}"
    fix = (
        "The shard's footer and index are intact, so the damage is inside "
        "the file (a bad disk or an interrupted overwrite). " + _tfds_fix(name, data_root, manual_dir, damaged=True)
    )
    message = f"A record cannot be read: {where}: ArrayRecord: {detail}. {fix}"
    check = prepare_command(name, data_root, verify=True) + " --full"
    return RecordReadError(message, where=where, detail=detail, fix=fix, check=check)


def _parallel(fn, items: Sequence[Any]) -> list[Any]:
    if len(items) <= 1:
        return [fn(*a) for a in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(_MAX_THREADS, len(items))) as pool:
        return list(pool.map(lambda a: fn(*a), items))


def verify_tfds(
    name: str,
    data_dir: str | None,
    splits: Sequence[str] | None = None,
    manual_dir: str | None = None,
    full: bool = False,
) -> list[CheckedSplit]:
    """Checks every shard of the splits of a TFDS ArrayRecord build.

    `splits`: split specs (``'train[:90%]'`` checks all shards of ``train``);
    None checks every split in ``dataset_info.json``. Raises
    `sources.DatasetNotPreparedError` when there is no build at all and
    `sources.DataIntegrityError` naming every bad shard. `manual_dir` only
    goes into the rebuild command of the message.
    """
    builder = sources.tfds_builder(name, data_dir)
    data_root = os.fspath(data_dir or builder.data_dir_root)
    infos = builder.info.splits
    sizes = {k: v.num_examples for k, v in infos.items()}
    names = []
    for spec in list(sizes) if splits is None else splits:
        for split in _split_names(spec, sizes):
            if split not in names:
                names.append(split)
    jobs = []
    for split in names:
        info = infos[split]
        for path, length in zip(info.filepaths, info.shard_lengths):
            jobs.append((split, os.fspath(path), int(length), full))
    results = _parallel(check_shard, jobs)
    problems = [p for p, _ in results if p is not None]
    if problems:
        raise integrity_error(name, data_root, problems, manual_dir)
    checked = []
    for split in names:
        n = sum(r for (s, *_), (_, r) in zip(jobs, results) if s == split)
        files = sum(1 for s, *_ in jobs if s == split)
        checked.append(CheckedSplit(split, files, n))
    return checked


def _idx_problem(split: str, path: str) -> ShardProblem | None:
    """Existence and size of one IDX file (raw, or gzip via its trailer)."""
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            path = candidate
            break
    else:
        return ShardProblem(split, path + "[.gz]", "missing", what="IDX file")
    try:
        dtype, shape = sources.read_idx_header(path)
    except (OSError, EOFError, ValueError, KeyError) as e:
        return ShardProblem(split, path, "size", detail=f"bad header: {e}", what="IDX file")
    size = 4 + 4 * len(shape) + dtype.itemsize * int(np.prod(shape))
    if path.endswith(".gz"):  # gzip's last 4 bytes: uncompressed size mod 2**32
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4))
            isize = struct.unpack("<I", f.read(4).rjust(4, b"\0"))[0]
        if isize != size % 2**32 and _gunzipped_size(path) != size:
            return ShardProblem(
                split,
                path,
                "size",
                size,
                isize,
                f"the gzip trailer gives {isize} bytes, its header needs {size}",
                what="IDX file",
            )
        return None
    actual = os.path.getsize(path)
    if actual != size:
        return ShardProblem(
            split, path, "size", size, actual, f"{actual} bytes, its header needs {size}", what="IDX file"
        )
    return None


def _gunzipped_size(path: str) -> int | None:
    """Uncompressed size by reading the whole file (None if it is cut off);
    only asked when the trailer disagrees (e.g. a multi-member gzip)."""
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    except (OSError, EOFError):
        return None
    return n


def verify_idx(name: str, idx_dir: str, splits: Sequence[str] | None = None) -> list[CheckedSplit]:
    """Checks the IDX files of `splits` (specs; None: train and test)."""
    names = []
    for spec in list(sources.IDX_FILES) if splits is None else splits:
        for split in _split_names(spec, {k: 0 for k in sources.IDX_FILES}):
            if split not in names:
                names.append(split)
    problems, checked = [], []
    for split in names:
        paths = sources.idx_paths(idx_dir, split)
        found = [p for p in (_idx_problem(split, f) for f in paths) if p]
        if not found:
            n_img = sources.read_idx_header(_existing(paths[0]))[1][0]
            n_lab = sources.read_idx_header(_existing(paths[1]))[1][0]
            if n_img != n_lab:
                found.append(
                    ShardProblem(
                        split,
                        paths[1],
                        "size",
                        n_img,
                        n_lab,
                        f"{n_lab} labels for the {n_img} images of {paths[0]}",
                        what="IDX file",
                    )
                )
            else:
                checked.append(CheckedSplit(split, 2, n_img))
        problems += found
    if problems:
        package = _IDX_PACKAGES.get(name)
        from bvit_jax.data.config import DEFAULT_IDX_DIRS

        if package and os.path.abspath(idx_dir) == DEFAULT_IDX_DIRS.get(name):
            fix = f"Reinstall them with `sudo apt-get install --reinstall {package}`."
        else:
            files = ", ".join(f for pair in sources.IDX_FILES.values() for f in pair)
            fix = f"Download the IDX files ({files}, gzipped or not) again into {idx_dir}."
        raise DataIntegrityError(
            f"The IDX files of data set {name!r} in {idx_dir} are incomplete or damaged: {_listing(problems)}. {fix}",
            problems,
        )
    return checked


def _existing(path: str) -> str:
    return path if os.path.exists(path) else path + ".gz"


def verify_data(config, splits: Sequence[str] | None = None, full: bool = False) -> list[CheckedSplit]:
    """Checks the data a data config will read, before anything compiles.

    `config`: a data ConfigDict (``config.data`` of the trainer). `splits`:
    split specs, default ``config.train_split`` and ``config.eval_split``.
    TFDS builds: every shard of those splits exists, opens (footer and index
    only) and holds the records ``dataset_info.json`` promises; IDX files:
    exist and have the size their headers give. Returns one `CheckedSplit`
    per underlying split; raises `sources.DataIntegrityError` (one paragraph:
    data set, split, file, problem, repair command) or
    `sources.DatasetNotPreparedError`.
    """
    if splits is None:
        splits = [config.train_split, config.eval_split]
    if config.source == "idx":
        return verify_idx(config.name, sources.config_idx_dir(config), splits)
    if config.source != "tfds":
        raise ValueError(f"Unknown data source {config.source!r} (tfds | idx)")
    return verify_tfds(config.name, config.data_dir, splits, manual_dir=config.get("manual_dir", None), full=full)
