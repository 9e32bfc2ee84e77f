"""Test fixtures for the input pipeline: a tiny ImageNet in the official layout.

`make_fake_imagenet(manual_dir)` writes what `tfds.builder('imagenet2012')`
expects in its manual dir:

* ``ILSVRC2012_img_train.tar``: a tar of per-synset tars (``n01440764.tar``,
  ...), each holding ``<wnid>_<k>.JPEG`` files;
* ``ILSVRC2012_img_val.tar``: a flat tar of ``ILSVRC2012_val_000000NN.JPEG``.

TFDS labels the validation images from its own shipped
``validation_labels.txt``: line ``i`` is the wnid of the ``i``-th validation
file name in sorted order. Using the real first file names makes those shipped
labels apply, so the test can assert them.

The train set deliberately contains the bad data seen in real ImageNet and in
scraped data sets: a CMYK JPEG, a grayscale JPEG, a PNG named ``.JPEG`` (none
of them in TFDS's list of known bad files, so the builder stores their bytes
as they are), plus two undecodable files (garbage after a JPEG header, and a
truncated JPEG) that the pipeline must skip and count.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile

import numpy as np
from PIL import Image

# First three ImageNet classes (TFDS labels.txt order = sorted wnids).
TRAIN_WNIDS = ("n01440764", "n01443537", "n01484850")
NUM_VAL = 6


@dataclasses.dataclass
class FakeImageNet:
    manual_dir: str
    # file name -> wnid, for every train image (good and bad).
    train_files: dict
    # File names of the train images that cannot be decoded.
    corrupt_files: tuple
    # File names of special-but-valid images.
    cmyk_file: str
    gray_file: str
    png_file: str
    # Validation file names in order.
    val_files: tuple


def _jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _random_image(rng: np.random.Generator, w: int, h: int, tint: int) -> Image.Image:
    """A smooth random colour image (JPEG-friendly), dominant channel `tint`."""
    small = rng.integers(0, 120, size=(max(h // 16, 2), max(w // 16, 2), 3))
    small[..., tint] += 120
    img = Image.fromarray(small.astype(np.uint8), "RGB")
    return img.resize((w, h), Image.Resampling.BILINEAR)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_fake_imagenet(manual_dir: str, seed: int = 0) -> FakeImageNet:
    """Writes the two official tars into `manual_dir` and describes them."""
    os.makedirs(manual_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (320, 240), (640, 427)]
    train_files = {}
    per_synset = {}
    for c, wnid in enumerate(TRAIN_WNIDS):
        files = {}
        for k, (w, h) in enumerate(sizes):
            files[f"{wnid}_{k + 1}.JPEG"] = _jpeg_bytes(_random_image(rng, w, h, c))
        per_synset[wnid] = files

    # Special but valid files, all in the first synset.
    wnid0 = TRAIN_WNIDS[0]
    cmyk_file = f"{wnid0}_1.JPEG"
    per_synset[wnid0][cmyk_file] = _jpeg_bytes(_random_image(rng, 400, 300, 0).convert("CMYK"))
    gray_file = f"{wnid0}_2.JPEG"
    per_synset[wnid0][gray_file] = _jpeg_bytes(_random_image(rng, 300, 400, 0).convert("L"))
    png_file = f"{wnid0}_3.JPEG"
    buf = io.BytesIO()
    _random_image(rng, 256, 200, 0).save(buf, format="PNG")
    per_synset[wnid0][png_file] = buf.getvalue()

    # Undecodable files in the second synset.
    wnid1 = TRAIN_WNIDS[1]
    garbage = f"{wnid1}_1.JPEG"
    per_synset[wnid1][garbage] = b"\xff\xd8\xff\xe0" + rng.bytes(2000)
    truncated = f"{wnid1}_2.JPEG"
    good = per_synset[wnid1][truncated]
    per_synset[wnid1][truncated] = good[: len(good) // 3]

    train_tar = os.path.join(manual_dir, "ILSVRC2012_img_train.tar")
    with tarfile.open(train_tar, "w") as outer:
        for wnid, files in per_synset.items():
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for name, data in files.items():
                    _add_bytes(inner, name, data)
                    train_files[name] = wnid
            _add_bytes(outer, f"{wnid}.tar", inner_buf.getvalue())

    val_files = tuple(f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(NUM_VAL))
    val_tar = os.path.join(manual_dir, "ILSVRC2012_img_val.tar")
    with tarfile.open(val_tar, "w") as tar:
        for i, name in enumerate(val_files):
            w, h = sizes[i % len(sizes)]
            img = _random_image(rng, w, h, i % 3)
            if i == 4:
                img = img.convert("L")  # a grayscale image in the eval set too
            _add_bytes(tar, name, _jpeg_bytes(img))

    return FakeImageNet(
        manual_dir=manual_dir,
        train_files=train_files,
        corrupt_files=(garbage, truncated),
        cmyk_file=cmyk_file,
        gray_file=gray_file,
        png_file=png_file,
        val_files=val_files,
    )


def shipped_validation_wnids(n: int) -> list:
    """The first `n` lines of TFDS's own imagenet2012 validation_labels.txt."""
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()[:n]


def imagenet_label_names() -> list:
    """TFDS's imagenet2012 labels.txt (class index -> wnid)."""
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    return path.read_text().split()


# ----------------------------------------------------------------------------
# pytest fixtures (import them into a test module to use them).
# ----------------------------------------------------------------------------

import fcntl  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402


def _build_once(root: pathlib.Path) -> dict:
    """Builds the fake ImageNet with TFDS's real builder under `root`, once.

    A file lock makes concurrent pytest-xdist workers share one build.
    """
    root.mkdir(parents=True, exist_ok=True)
    manual_dir = root / "manual"
    data_dir = root / "tfds"
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fake = make_fake_imagenet(str(manual_dir))  # deterministic: same bytes
        if not (root / "build.done").exists():
            from bvit_jax.data import prepare

            prepare.prepare("imagenet2012", str(data_dir), str(manual_dir))
            (root / "build.done").write_text("ok")
        fcntl.flock(lock, fcntl.LOCK_UN)
    return {"fake": fake, "data_dir": str(data_dir), "manual_dir": str(manual_dir)}


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory):
    """The tiny ImageNet, prepared by TFDS as ArrayRecord: a dict with
    ``fake`` (a `FakeImageNet`), ``data_dir`` and ``manual_dir``."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # share one build between workers
        base = base.parent
    return _build_once(base / "fake_imagenet")


# ----------------------------------------------------------------------------
# Damaged copies of the build (issue 16): each helper damages a real file the
# way an interrupted copy or a bad disk does.
# ----------------------------------------------------------------------------

import shutil  # noqa: E402


def shard_file(data_dir, split: str, k: int = 0) -> pathlib.Path:
    """Path of shard `k` of `split` in a prepared imagenet2012 `data_dir`
    (named by TFDS's ``filepathTemplate``, listed in ``dataset_info.json``)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    return pathlib.Path(builder.info.splits[split].filepaths[k])


def truncate_shard(path, fraction: float = 0.5) -> int:
    """Keeps the first `fraction` of a file's bytes (an interrupted copy)."""
    path = pathlib.Path(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    return len(raw)


def rewrite_with_fewer_records(path, keep: int) -> None:
    """Rewrites an ArrayRecord shard with only its first `keep` records: a
    valid file that holds fewer records than ``dataset_info.json`` promises."""
    from array_record.python import array_record_module as arm

    reader = arm.ArrayRecordReader(str(path))
    records = reader.read_all()
    reader.close()
    writer = arm.ArrayRecordWriter(str(path), "group_size:1")
    for r in records[:keep]:
        writer.write(r)
    writer.close()


def readable_positions(path) -> tuple[list, list]:
    """``(readable, unreadable)`` record positions of an ArrayRecord shard,
    reading each record on its own."""
    from array_record.python import array_record_module as arm

    reader = arm.ArrayRecordReader(str(path), "readahead_buffer_size:0")
    good, bad = [], []
    for i in range(reader.num_records()):
        try:
            reader.read([i])
            good.append(i)
        except RuntimeError:
            bad.append(i)
    reader.close()
    return good, bad


def corrupt_middle_chunk(path, nbytes: int = 64) -> list:
    """Flips `nbytes` bytes in the middle of a shard, away from its footer and
    index, so that the file still opens but a record's chunk fails its hash.
    Returns the positions of the records that no longer read (checked by
    reading every record; at least one, and not all)."""
    path = pathlib.Path(path)
    raw = bytearray(path.read_bytes())
    start = len(raw) // 3 + 1000  # inside a chunk, not at a 64 KiB block header
    for i in range(start, start + nbytes):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    good, bad = readable_positions(path)
    assert bad and good, (good, bad)
    return bad


@pytest.fixture
def build_copy(fake_imagenet, tmp_path):
    """A private copy of the prepared tiny ImageNet to damage: the
    `fake_imagenet` dict with ``data_dir`` pointing into `tmp_path`."""
    data_dir = tmp_path / "tfds"
    shutil.copytree(fake_imagenet["data_dir"], data_dir)
    return {**fake_imagenet, "data_dir": str(data_dir)}


def device_batch(batch: dict, config, num_classes: int, step: int = 0, seed: int = 0) -> dict:
    """The model's train batch of a host batch (``uint8``): `bvit_jax.data.DevicePreprocess` as the trainer
    applies it at step `step`, jitted, back as numpy arrays (``_``-free keys of `batch` kept)."""
    import jax

    from bvit_jax.data import DevicePreprocess

    prep = DevicePreprocess.from_config(config, num_classes, seed)
    if prep not in _DEVICE_STEPS:  # one compilation per setting (and shape)
        _DEVICE_STEPS[prep] = jax.jit(lambda b, s: prep(b, prep.key(s)))
    out = _DEVICE_STEPS[prep](dict(batch), step)
    return {k: np.asarray(v) for k, v in out.items()}


_DEVICE_STEPS: dict = {}
