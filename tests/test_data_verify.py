"""Damaged data (issue 16): checked before anything compiles, named in the message.

Every test damages a private copy of the tiny ImageNet that TFDS's real
`imagenet2012` builder wrote as ArrayRecord (`data_fixtures`): a shard
truncated as an interrupted copy leaves it, a missing shard, a shard holding
fewer records than ``dataset_info.json`` promises, and a shard whose footer
is intact but one chunk in the middle is corrupted (only found when that
record is read, mid-training).
"""

import gzip
import logging
import pickle

import numpy as np
import pytest

from bvit_jax import data
from bvit_jax.data import prepare, sources, verify
from tests.data_fixtures import (
    corrupt_middle_chunk,
    readable_positions,
    rewrite_with_fewer_records,
    shard_file,
    truncate_shard,
)

REBUILD = "python -m bvit_jax.data.prepare --dataset=imagenet2012"


def _config(build, **overrides):
    c = data.default_data_config("imagenet2012")
    c.data_dir = build["data_dir"]
    c.image_size = 32
    c.num_threads = 2
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _assert_names_everything(msg, build, split, path, what):
    """The message names data set, split, file, the problem and the fix."""
    assert "data set 'imagenet2012'" in msg
    assert f"split {split!r}" in msg
    assert str(path) in msg
    assert what in msg
    assert (
        f"{REBUILD} --manual_dir=<folder with ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar> --data_dir={build['data_dir']} --rebuild" in msg
    )
    assert f"python -m bvit_jax.data.prepare --verify --dataset=imagenet2012 --data_dir={build['data_dir']}" in msg
    assert "\n" not in msg  # one paragraph


def _verify_cli(build, capsys, *flags):
    code = prepare.main(["--verify", "--dataset=imagenet2012", f"--data_dir={build['data_dir']}", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_intact_build_passes_the_check_and_the_command(build_copy, capsys):
    checked = data.verify_data(_config(build_copy))
    assert checked == [verify.CheckedSplit("train", 1, 12), verify.CheckedSplit("validation", 1, 6)]
    # A sliced split checks the shards of its split.
    assert data.verify_data(_config(build_copy), ["train[:90%]"]) == checked[:1]
    code, out, err = _verify_cli(build_copy, capsys, "--full")
    assert code == 0, err
    assert "train: 1 file, 12 records" in out
    assert "validation: 1 file, 6 records" in out


def test_truncated_shard_stops_the_trainer_before_compiling(build_copy, capsys, tmp_path):
    path = shard_file(build_copy["data_dir"], "train")
    size = truncate_shard(path, 0.5)
    c = _config(build_copy, train_split="train[:90%]")
    with pytest.raises(data.DataIntegrityError) as e:
        data.verify_data(c)
    msg = str(e.value)
    _assert_names_everything(msg, build_copy, "train", path, "is truncated or unreadable")
    assert f"({size // 2} bytes; ArrayRecord: " in msg
    assert "RiegeliPostscript" in msg  # ArrayRecord's own reason
    [problem] = e.value.problems
    assert (problem.kind, problem.split, problem.path) == ("unreadable", "train", str(path))
    # The split the run does not read is not its problem.
    data.verify_data(c, ["validation"])

    # The same check from the command line: exit status 2, message on stderr.
    code, _, err = _verify_cli(build_copy, capsys)
    assert code == 1 and str(path) in err and "truncated or unreadable" in err

    # The trainer stops with it before building or compiling anything.
    from bvit_jax.train.trainer import train_and_evaluate
    from tests.train_helpers import tiny_config

    cfg = tiny_config("fp")
    cfg.data = c
    cfg.model.num_classes = 1000
    with pytest.raises(data.DataIntegrityError, match="truncated or unreadable"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()

    # Reading it anyway (no check) names the shard instead of grain's error.
    it = data.create_train_iterator(c, 4, seed=0, process_index=0, process_count=1)
    with pytest.raises(data.DataIntegrityError, match="truncated or unreadable"):
        next(it)


def test_missing_shard_is_named(build_copy, capsys):
    path = shard_file(build_copy["data_dir"], "validation")
    path.unlink()
    with pytest.raises(data.DataIntegrityError) as e:
        data.verify_data(_config(build_copy))
    _assert_names_everything(str(e.value), build_copy, "validation", path, f"shard file {path} is missing")
    code, _, err = _verify_cli(build_copy, capsys, "--splits=validation")
    assert code == 1 and f"{path} is missing" in err
    # A run that reads only train is not stopped by it.
    data.verify_data(_config(build_copy, eval_split="train[90%:]"))


def test_shard_with_fewer_records_than_dataset_info(build_copy):
    path = shard_file(build_copy["data_dir"], "train")
    rewrite_with_fewer_records(path, 10)
    with pytest.raises(data.DataIntegrityError) as e:
        data.verify_data(_config(build_copy))
    _assert_names_everything(
        str(e.value), build_copy, "train", path, f"shard file {path} holds 10 records, dataset_info.json promises 12"
    )


def test_several_bad_shards_are_listed_in_one_message(build_copy):
    train = shard_file(build_copy["data_dir"], "train")
    val = shard_file(build_copy["data_dir"], "validation")
    truncate_shard(train, 0.3)
    val.unlink()
    with pytest.raises(data.DataIntegrityError) as e:
        verify.verify_tfds("imagenet2012", build_copy["data_dir"], manual_dir="/data/tars")
    msg = str(e.value)
    assert f"split 'train': shard file {train} is truncated" in msg
    assert f"split 'validation': shard file {val} is missing" in msg
    assert (f"{REBUILD} --manual_dir=/data/tars --data_dir={build_copy['data_dir']} --rebuild") in msg
    # The error survives pickling (grain worker processes send it back).
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is data.DataIntegrityError and str(back) == msg
    assert back.problems == e.value.problems


def test_corrupted_chunk_is_skipped_counted_and_stops_past_the_limit(build_copy, capsys, caplog):
    path = shard_file(build_copy["data_dir"], "train")
    bad = corrupt_middle_chunk(path)
    # The footer and index are intact: the cheap check passes ...
    data.verify_data(_config(build_copy))
    # ... a full read finds the record.
    code, _, err = _verify_cli(build_copy, capsys, "--full")
    assert code == 1
    assert f"shard file {path} has {len(bad)} unreadable record(s) of 12" in err
    assert f"positions {bad[0]}" in err

    # Reading the record names data set, split, shard and record.
    source = sources.TfdsSource("imagenet2012", "train", build_copy["data_dir"])
    with pytest.raises(data.RecordReadError) as e:
        source[bad[0]]
    msg = str(e.value)
    assert (
        f"data set 'imagenet2012' in {build_copy['data_dir']}, split 'train', shard file {path}, record {bad[0]}"
    ) in msg
    assert "Corrupted Riegeli/records file" in msg
    assert "--full" in msg and "--rebuild" in msg

    # Training within the limit: skipped and counted like undecodable images.
    c = _config(build_copy, repeated_aug=1, return_index=True)
    data.reset_data_stats()
    with caplog.at_level(logging.WARNING, logger="bvit_jax.data.transforms"):
        it = data.create_train_iterator(c, 4, seed=0, process_index=0, process_count=1)
        batches = [next(it) for _ in range(6)]  # two epochs of 12
    used = set(np.concatenate([b["index"] for b in batches]).tolist())
    assert not used & set(bad)
    stats = data.data_stats()
    assert stats["train_examples"] == 24
    assert stats["train_unreadable"] == 2 * len(bad)  # once per epoch
    corrupt_images = {
        i for i in range(12) if i not in bad and source.raw(i)["file_name"].decode() in build_copy["fake"].corrupt_files
    }
    assert not used & corrupt_images
    # Replacements are random examples, which can be bad too: at least.
    assert stats["train_skipped"] >= 2 * len(bad) + 2 * len(corrupt_images)
    warned = [r.getMessage() for r in caplog.records if "Skipped an unreadable train record" in r.getMessage()]
    assert len(warned) >= 2 * len(bad)  # (grain prefetches further batches)
    assert f"shard file {path}, record {bad[0]}" in warned[0]

    # Eval masks the record out and counts it.
    ev = list(data.create_eval_iterator(c, 4, 0, 1, split="train"))
    mask = np.concatenate([b["mask"] for b in ev])
    index = np.concatenate([b["index"] for b in ev])
    assert set(bad) <= set(index[~mask & (index >= 0)].tolist())
    assert data.data_stats()["eval_unreadable"] == len(bad)

    # Past the limit (no replacements allowed) the run stops with the shard named.
    vpath = shard_file(build_copy["data_dir"], "validation")
    vbad = corrupt_middle_chunk(vpath)
    c = _config(build_copy, train_split="validation", max_decode_retries=0, repeated_aug=1)
    it = data.create_train_iterator(c, 6, seed=0, process_index=0, process_count=1)
    with pytest.raises(data.DataIntegrityError) as e:
        next(it)
    msg = str(e.value)
    assert msg.startswith(
        "Training stopped: 1 train record in a row could not "
        "be used (config.data.max_decode_retries=0 "
        "replacements allowed): data set 'imagenet2012'"
    )
    assert f"split 'validation', shard file {vpath}, record {vbad[0]}" in msg
    assert "Checkpoints already written are not touched" in msg
    assert "--rebuild" in msg


def test_trainer_finishes_with_the_skip_counted_and_keeps_checkpoints(build_copy, tmp_path):
    from bvit_jax.train.trainer import train_and_evaluate
    from tests.train_helpers import tiny_config

    path = shard_file(build_copy["data_dir"], "validation")
    bad = corrupt_middle_chunk(path)
    cfg = tiny_config("fp", total_steps=2, checkpoint_every_steps=2, eval_batch_size=8, diagnostics_every_steps=0)
    cfg.data = _config(
        build_copy, image_size=28, train_split="validation", eval_split="train", num_threads=1, prefetch=1
    )
    cfg.model.num_classes = 1000
    data.reset_data_stats()
    metrics = train_and_evaluate(cfg, tmp_path)
    stats = data.data_stats()
    assert stats["train_unreadable"] >= 1 and stats["train_skipped"] >= 1
    assert metrics["examples"] == 10  # 12 train images, 2 undecodable masked
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints == ["2"]

    # Resumed with no replacements allowed: stops at the bad record, leaves
    # the checkpoint as it was.
    cfg.total_steps = 4
    cfg.data.max_decode_retries = 0
    with pytest.raises(data.DataIntegrityError, match=f"shard file {path}, record {bad[0]}"):
        train_and_evaluate(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == checkpoints


def test_rebuild_command_repairs_a_damaged_build(build_copy, capsys):
    truncate_shard(shard_file(build_copy["data_dir"], "train"), 0.5)
    assert (
        prepare.main(
            [
                "--dataset=imagenet2012",
                f"--manual_dir={build_copy['manual_dir']}",
                f"--data_dir={build_copy['data_dir']}",
                "--rebuild",
            ]
        )
        == 0
    )
    code, _, err = _verify_cli(build_copy, capsys)
    assert code == 0, err
    good, bad = readable_positions(shard_file(build_copy["data_dir"], "train"))
    assert len(good) == 12 and not bad


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_missing_or_truncated(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 8)):
        images, labels = sources.IDX_FILES[split]
        _write_idx(tmp_path / f"{images}.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{labels}.gz", rng.integers(0, 10, (n,)))
    c = data.default_data_config("fashion_mnist")
    c.idx_dir = str(tmp_path)
    assert data.verify_data(c) == [verify.CheckedSplit("train", 2, 20), verify.CheckedSplit("test", 2, 8)]
    truncate_shard(tmp_path / "t10k-images-idx3-ubyte.gz", 0.6)
    with pytest.raises(data.DataIntegrityError) as e:
        data.verify_data(c)
    msg = str(e.value)
    assert "data set 'fashion_mnist'" in msg and "split 'test'" in msg
    assert f"IDX file {tmp_path}/t10k-images-idx3-ubyte.gz is truncated" in msg
    assert f"again into {tmp_path}" in msg
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataIntegrityError, match="train-labels-idx1-ubyte\\[.gz\\] is missing"):
        data.verify_data(c, ["train[:90%]"])


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """A TFDS ArrayRecord build whose train split has 3 shards (10 records each)."""
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("tfds_sharded")
    rng = np.random.default_rng(0)

    def examples(n):  # noise PNGs (~12 KB): chunks of real size
        return [(i, {"image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "label": i % 2}) for i in range(n)]

    tfds.dataset_builders.store_as_tfds_dataset(
        name="sharded_noise",
        version="1.0.0",
        features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(64, 64, 3)), "label": tfds.features.ClassLabel(num_classes=2)}
        ),
        split_datasets={"train": examples(30), "test": examples(6)},
        data_dir=str(data_dir),
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(num_shards=3),
    )
    return data_dir


def test_one_bad_shard_among_several_is_the_one_named(three_shards, tmp_path):
    import shutil

    import tensorflow_datasets as tfds

    data_dir = tmp_path / "tfds"
    shutil.copytree(three_shards, data_dir)
    info = tfds.builder("sharded_noise", data_dir=str(data_dir)).info
    shards = [str(p) for p in info.splits["train"].filepaths]
    lengths = info.splits["train"].shard_lengths
    assert len(shards) == 3 and sum(lengths) == 30
    assert verify.verify_tfds("sharded_noise", str(data_dir)) == [
        verify.CheckedSplit("train", 3, 30),
        verify.CheckedSplit("test", 3, 6),
    ]

    # A damaged chunk in the last shard: the record is attributed to it,
    # through a sliced split that skips the first 5 examples.
    bad = corrupt_middle_chunk(shards[2])
    source = sources.TfdsSource("sharded_noise", "train[5:]", str(data_dir))
    index = lengths[0] + lengths[1] + bad[0] - 5
    with pytest.raises(data.RecordReadError) as e:
        source[index]
    assert (f"split 'train', shard file {shards[2]}, record {bad[0]} (example {index} of 'train[5:]')") in str(e.value)
    assert source[index - 1] is not None  # its neighbour still reads

    # The middle shard truncated: only that shard is named.
    truncate_shard(shards[1], 0.5)
    with pytest.raises(data.DataIntegrityError) as e:
        verify.verify_tfds("sharded_noise", str(data_dir), ["train[:90%]"])
    msg = str(e.value)
    assert f"shard file {shards[1]} is truncated or unreadable" in msg
    assert shards[0] not in msg and shards[2] not in msg
    assert (f"python -m bvit_jax.data.prepare --dataset=sharded_noise --data_dir={data_dir} --rebuild") in msg
