"""Random-access data sources: TFDS ArrayRecord builds and raw IDX files.

Every source here is a grain ``RandomAccessDataSource`` (``__len__`` and
``__getitem__``) whose records are ``{'image': bytes | uint8 ndarray,
'label': int}``: encoded bytes for TFDS image features (decoded later by
`decode.py`, so bad files can be skipped), a ``[H, W, C]`` array for IDX.
Sources are picklable so grain worker processes can open them.

Split specs follow TFDS's grammar (``'train'``, ``'train[:90%]'``,
``'train[54000:]'``, ``'train+test'``) and, for IDX files, are resolved with
TFDS's own parser (`tfds.core.ReadInstruction`), so percentages round the
same way in both backends.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import threading
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

from bvit_jax.errors import UserError

PREPARE_COMMAND = (
    "python -m bvit_jax.data.prepare --dataset={name} "
    "--manual_dir=<folder with the downloaded files> --data_dir={data_dir}"
)


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """The TFDS build of a data set is missing from `data_dir`."""


class DataIntegrityError(UserError, RuntimeError):
    """Prepared data that cannot be read as promised.

    Raised by `bvit_jax.data.verify` (a shard file of a split is missing,
    truncated or unreadable, or holds another number of records than
    ``dataset_info.json`` promises; IDX files missing or of the wrong size),
    by `TfdsSource` when a whole shard turns out unreadable while reading,
    and by the train pipeline when more records in a row than
    ``config.data.max_decode_retries`` allows cannot be used. ``str(e)`` is
    one paragraph naming the data set, split and file, what is wrong, and the
    command that repairs it, so a command line can print it without a
    traceback. ``problems`` holds the per-file findings
    (`verify.ShardProblem`) where there are any.
    """

    def __init__(self, message: str, problems: Sequence[Any] = ()):
        super().__init__(message)
        self.problems = tuple(problems)


class RecordReadError(DataIntegrityError):
    """One record of a shard that opens fine cannot be read (a damaged chunk).

    The train pipeline skips such records and counts them like undecodable
    images; the eval pipeline masks them out. Attributes: ``where`` (data
    set, split, shard file and record, as words), ``detail`` (ArrayRecord's
    error), ``fix`` (what to do, with the commands), ``check`` (the command
    that lists every damaged record).
    """

    def __init__(self, message: str, where: str = "", detail: str = "", fix: str = "", check: str = ""):
        super().__init__(message)
        self.where = where
        self.detail = detail
        self.fix = fix
        self.check = check


# ----------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST format).
# ----------------------------------------------------------------------------

# IDX type codes (third magic byte) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

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
# The label names of the IDX data sets, by data-set name (`metadata.class_names`).
IDX_CLASSES = {"fashion_mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}


def _open_maybe_gz(path: str):
    if os.path.exists(path):
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    if os.path.exists(path + ".gz"):
        return gzip.open(path + ".gz", "rb")
    raise FileNotFoundError(f"IDX file not found: {path}[.gz]")


def read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Dtype and shape from an IDX header (LeCun's MNIST file format).

    Header: two zero bytes, a type code (0x08 = uint8, ...), the number of
    dimensions ``n``, then ``n`` big-endian int32 sizes; the data follow in C
    order.
    """
    with _open_maybe_gz(path) as f:
        magic = f.read(4)
        if len(magic) != 4 or magic[0] != 0 or magic[1] != 0:
            raise ValueError(f"{path}: not an IDX file (magic {magic!r})")
        dtype = _IDX_DTYPES[magic[2]]
        ndim = magic[3]
        shape = tuple(int(d) for d in np.frombuffer(f.read(4 * ndim), ">i4"))
    return dtype, shape


def read_idx(path: str) -> np.ndarray:
    """Reads a whole IDX file (``.gz`` or raw) into a native-endian array."""
    with _open_maybe_gz(path) as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw[4 : 4 + 4 * ndim], ">i4"))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    data = np.frombuffer(raw, dtype, count=count, offset=offset)
    if offset + count * dtype.itemsize != len(raw):
        raise ValueError(f"{path}: size does not match its header {shape}")
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


_IDX_CACHE: dict[str, np.ndarray] = {}
_IDX_LOCK = threading.Lock()


def _cached_idx(path: str) -> np.ndarray:
    with _IDX_LOCK:
        if path not in _IDX_CACHE:
            _IDX_CACHE[path] = read_idx(path)
        return _IDX_CACHE[path]


def idx_paths(idx_dir: str, split: str) -> tuple[str, str]:
    """``(images, labels)``: the paths of the IDX files of ``split`` ('train' or 'test') in ``idx_dir``."""
    if split not in IDX_FILES:
        raise ValueError(f"IDX split must be one of {list(IDX_FILES)}, got {split!r}")
    images, labels = IDX_FILES[split]
    return os.path.join(idx_dir, images), os.path.join(idx_dir, labels)


def idx_split_sizes(idx_dir: str) -> dict[str, int]:
    """Number of examples of each IDX split, read from the headers only."""
    sizes = {}
    for split in IDX_FILES:
        images, labels = idx_paths(idx_dir, split)
        n_img = read_idx_header(images)[1][0]
        n_lab = read_idx_header(labels)[1][0]
        if n_img != n_lab:
            raise ValueError(f"{idx_dir}: {split} has {n_img} images, {n_lab} labels")
        sizes[split] = n_img
    return sizes


@dataclasses.dataclass(frozen=True)
class _Range:
    base: Any  # a RandomAccessDataSource over a whole split
    start: int
    stop: int


class IdxSplit:
    """One whole IDX split; images as ``uint8 [H, W, 1]``. Loads lazily."""

    def __init__(self, idx_dir: str, split: str):
        self.images_path, self.labels_path = idx_paths(idx_dir, split)
        self._len = read_idx_header(self.labels_path)[1][0]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        images = _cached_idx(self.images_path)
        labels = _cached_idx(self.labels_path)
        return {"image": images[index][..., None], "label": int(labels[index])}

    def labels(self) -> np.ndarray:
        return _cached_idx(self.labels_path)


class SlicedSource:
    """Concatenation of index ranges of whole-split sources (a split spec)."""

    def __init__(self, ranges: Sequence[_Range]):
        self._ranges = tuple(ranges)
        self._offsets = np.cumsum([0] + [r.stop - r.start for r in ranges])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        r = self._ranges[k]
        return r.base[r.start + index - int(self._offsets[k])]

    def __repr__(self) -> str:
        return f"SlicedSource({[(r.base, r.start, r.stop) for r in self._ranges]})"


def resolve_split(spec: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """``'train[:90%]+test'`` -> ``[('train', 0, 54000), ('test', 0, 10000)]``.

    Uses TFDS's split parser, so rounding of percentages is TFDS's ('closest').
    """
    import tensorflow_datasets as tfds

    instruction = tfds.core.ReadInstruction.from_spec(spec)
    infos = {k: types.SimpleNamespace(num_examples=v) for k, v in sizes.items()}
    out = []
    for a in instruction.to_absolute(infos):
        start = 0 if a.from_ is None else int(a.from_)
        stop = sizes[a.splitname] if a.to is None else int(a.to)
        out.append((a.splitname, start, stop))
    return out


def idx_source(idx_dir: str, spec: str) -> SlicedSource:
    """A source over an IDX split spec, e.g. ``idx_source(d, 'train[90%:]')``."""
    sizes = idx_split_sizes(idx_dir)
    ranges = [_Range(IdxSplit(idx_dir, name), a, b) for name, a, b in resolve_split(spec, sizes)]
    return SlicedSource(ranges)


# ----------------------------------------------------------------------------
# TFDS.
# ----------------------------------------------------------------------------


def tfds_builder(name: str, data_dir: str | None):
    """`tfds.builder`, raising a message with the prepare command if unbuilt."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"TFDS data set {name!r} is not prepared under {builder.data_dir!r}. "
            "Prepare it once with:\n  " + PREPARE_COMMAND.format(name=name, data_dir=data_dir or "<data_dir>")
        )
    return builder


@dataclasses.dataclass(frozen=True)
class ShardRead:
    """The part of one shard file that a split spec reads."""

    split: str  # the underlying split, e.g. 'train' for 'train[:90%]'
    path: str  # the shard file
    skip: int  # first record read in the shard
    take: int  # records read from the shard
    examples_in_shard: int  # records the shard holds (dataset_info.json)


def tfds_shard_reads(builder, spec: str) -> list[ShardRead]:
    """The shard files a split spec reads, in the order ``tfds.data_source``
    concatenates them (from ``dataset_info.json``; no file is opened)."""
    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    out = []
    for split, start, stop in resolve_split(spec, sizes):
        if stop <= start:
            continue
        for fi in builder.info.splits[f"{split}[{start}:{stop}]"].file_instructions:
            out.append(ShardRead(split, os.fspath(fi.filename), int(fi.skip), int(fi.take), int(fi.examples_in_shard)))
    return out


class TfdsSource:
    """A TFDS ArrayRecord split; images stay encoded (``SkipDecoding``).

    Reads with ``tfds.data_source`` (no TensorFlow needed). A record that
    cannot be read raises `RecordReadError` naming the data set, split, shard
    file and record (the shard opens, only that record's chunk is damaged),
    or `DataIntegrityError` when the whole shard does not open any more.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        image_key: str = "image",
        label_key: str = "label",
        manual_dir: str | None = None,
    ):
        import tensorflow_datasets as tfds

        builder = tfds_builder(name, data_dir)  # clear error if not prepared
        self._source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders={image_key: tfds.decode.SkipDecoding()}
        )
        self._image_key = image_key
        self._label_key = label_key
        self._name = name
        self._spec = split
        self._data_root = os.fspath(data_dir or builder.data_dir_root)
        self._manual_dir = manual_dir
        self._shards = tuple(tfds_shard_reads(builder, split))
        self._shard_starts = np.cumsum([0] + [s.take for s in self._shards])
        if int(self._shard_starts[-1]) != len(self._source):  # cannot attribute
            self._shards = ()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._read(int(index))
        return {"image": record[self._image_key], "label": int(record[self._label_key])}

    def raw(self, index: int) -> dict[str, Any]:
        """The full TFDS record (e.g. with ``file_name``), image still encoded."""
        return self._read(int(index))

    def shard_of(self, index: int) -> tuple[ShardRead, int] | None:
        """``(shard, position of the record in the shard file)`` of `index`."""
        if not self._shards or not 0 <= index < len(self):
            return None
        k = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        shard = self._shards[k]
        return shard, shard.skip + index - int(self._shard_starts[k])

    def _read(self, index: int):
        try:
            return self._source[index]
        except RuntimeError as e:  # array_record / Riegeli read errors
            raise self._read_error(index, e) from e

    def _read_error(self, index: int, error: Exception) -> DataIntegrityError:
        from bvit_jax.data import verify

        located = self.shard_of(index)
        if located is not None:
            shard, _ = located
            problem, _ = verify.check_shard(shard.split, shard.path, shard.examples_in_shard)
            if problem is not None:  # the whole shard is gone, not one record
                return verify.integrity_error(self._name, self._data_root, [problem], self._manual_dir)
        return verify.record_read_error(
            self._name, self._data_root, self._spec, index, located, str(error), self._manual_dir
        )

    def __repr__(self) -> str:
        return f"TfdsSource({self._source!r})"


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    num_classes: int
    num_examples: dict  # split spec -> number of examples


def get_source(config, split: str):
    """The data source of `config` (a data ConfigDict) for split spec `split`."""
    if config.source == "idx":
        return idx_source(config_idx_dir(config), split)
    if config.source == "tfds":
        return TfdsSource(
            config.name,
            split,
            config.data_dir,
            config.image_key,
            config.label_key,
            manual_dir=config.get("manual_dir", None),
        )
    raise ValueError(f"Unknown data source {config.source!r} (tfds | idx)")


def config_idx_dir(config) -> str:
    """The IDX folder a data config reads: ``config.idx_dir``, or the data set's default folder."""
    from bvit_jax.data.config import DEFAULT_IDX_DIRS

    idx_dir = config.idx_dir or DEFAULT_IDX_DIRS.get(config.name)
    if not idx_dir:
        raise ValueError(f"config.idx_dir is not set for {config.name!r}")
    return idx_dir


def source_info(config, splits: Sequence[str]) -> SourceInfo:
    """Number of classes and the sizes of `splits`, without reading images."""
    if config.source == "idx":
        idx_dir = config_idx_dir(config)
        sizes = idx_split_sizes(idx_dir)
        num = {s: sum(b - a for _, a, b in resolve_split(s, sizes)) for s in splits}
        num_classes = config.num_classes
        if num_classes is None:
            num_classes = int(IdxSplit(idx_dir, "train").labels().max()) + 1
        return SourceInfo(num_classes, num)
    builder = tfds_builder(config.name, config.data_dir)
    num = {s: builder.info.splits[s].num_examples for s in splits}
    num_classes = config.num_classes
    if num_classes is None:
        num_classes = builder.info.features[config.label_key].num_classes
    return SourceInfo(int(num_classes), num)
