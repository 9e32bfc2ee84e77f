"""End-to-end input pipeline on a tiny ImageNet built by TFDS's real builder.

The session fixture writes the official tars (per-synset train tars, a val
tar with real validation file names) and runs TFDS's `imagenet2012` builder
into ArrayRecord once; every test reads that build through
`tfds.data_source` + grain.
"""

import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from bvit_jax import data
from bvit_jax.data import decode as decode_lib
from bvit_jax.data import eval_transform, prepare, sources
from tests.data_fixtures import device_batch, imagenet_label_names, shipped_validation_wnids
from tests.tolerances import assert_within, gamma_n

NAMES = None


def _names():
    global NAMES
    if NAMES is None:
        NAMES = imagenet_label_names()
    return NAMES


def _config(build, **overrides):
    c = data.default_data_config("imagenet2012")
    c.data_dir = build["data_dir"]
    c.image_size = 64  # small to keep the tests fast; geometry is size-free
    c.num_threads = 2
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_tfds_build_has_the_right_labels(fake_imagenet):
    fake = fake_imagenet["fake"]
    names = _names()
    train = sources.TfdsSource("imagenet2012", "train", fake_imagenet["data_dir"])
    assert len(train) == len(fake.train_files) == 12
    seen = set()
    for i in range(len(train)):
        rec = train.raw(i)
        fname = rec["file_name"].decode()
        seen.add(fname)
        assert names[rec["label"]] == fake.train_files[fname]
        assert rec["label"] in (0, 1, 2)  # n01440764, n01443537, n01484850
    assert seen == set(fake.train_files)

    # Validation labels come from TFDS's shipped file, by sorted file name.
    val = sources.TfdsSource("imagenet2012", "validation", fake_imagenet["data_dir"])
    expected = dict(zip(sorted(fake.val_files), shipped_validation_wnids(len(fake.val_files))))
    assert expected["ILSVRC2012_val_00000001.JPEG"] == "n01751748"
    got = {val.raw(i)["file_name"].decode(): names[val.raw(i)["label"]] for i in range(len(val))}
    assert got == expected

    info = data.dataset_info(_config(fake_imagenet))
    assert info == data.DatasetInfo(num_classes=1000, image_shape=(64, 64, 3), num_train=12, num_eval=6)


def test_bad_files_decode_or_raise(fake_imagenet):
    fake = fake_imagenet["fake"]
    train = sources.TfdsSource("imagenet2012", "train", fake_imagenet["data_dir"])
    by_name = {train.raw(i)["file_name"].decode(): train.raw(i)["image"] for i in range(len(train))}
    # CMYK: decoded to RGB with the right colours (class 0 images are red).
    cmyk = decode_lib.open_image(by_name[fake.cmyk_file])
    assert cmyk.mode == "CMYK"
    rgb = np.asarray(decode_lib.load(cmyk, 3), np.float32)
    assert rgb.shape == (300, 400, 3)
    r, g, b = rgb.reshape(-1, 3).mean(0)
    assert r > g + 60 and r > b + 60
    # Grayscale JPEG -> three equal channels; also as 1 channel.
    gray = np.asarray(decode_lib.decode(by_name[fake.gray_file], 3))
    assert gray.shape == (400, 300, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    assert np.asarray(decode_lib.decode(by_name[fake.gray_file], 1)).shape == (400, 300)
    # PNG named .JPEG: identified by content.
    png = decode_lib.open_image(by_name[fake.png_file])
    assert png.format == "PNG"
    assert np.asarray(decode_lib.load(png, 3)).shape == (200, 256, 3)
    # Corrupt and truncated files raise DecodeError (never crash with OSError).
    for name in fake.corrupt_files:
        with pytest.raises(decode_lib.DecodeError):
            eval_transform.eval_image(by_name[name], eval_transform.eval_settings(_config(fake_imagenet)))


def test_train_batches_shapes_dtypes_ranges_and_labels(fake_imagenet):
    # No random erasing / mixup: pixel range is that of normalised [0, 255].
    c = _config(fake_imagenet, random_erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, return_index=True)
    it = data.create_train_iterator(c, 4, seed=0, process_index=0, process_count=1)
    lo = (0 - np.array(c.mean)) / np.array(c.std)
    hi = (1 - np.array(c.mean)) / np.array(c.std)
    for step, host in enumerate(_take(it, 3)):
        # The host half: uint8 images and int labels; the device half makes the model's batch.
        assert host["image"].shape == (4, 64, 64, 3) and host["image"].dtype == np.uint8
        assert host["label"].shape == (4,) and host["label"].dtype == np.int32
        b = device_batch(host, c, 1000, step)
        assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4, 1000) and b["label"].dtype == np.float32
        assert b["label_index"].shape == (4,) and b["label_index"].dtype == np.int32
        x = b["image"].reshape(-1, 3)
        assert np.all(x >= lo - 1e-5) and np.all(x <= hi + 1e-5)
        assert x.std() > 0.1
        # 1000 float32 entries within 3u each, summed in any order: |sum - 1| <= gamma_{1000+3}.
        assert_within(b["label"].sum(1), 1.0, gamma_n(1000 + 3), "row sums")
        # Smoothing 0.1: 0.9 + 0.1/1000 on the true class (three float32 roundings).
        assert_within(b["label"].max(1), 0.9 + 1e-4, gamma_n(3) * (0.9 + 1e-4), "on-value")
        np.testing.assert_array_equal(b["label"].argmax(1), b["label_index"])
        assert set(b["label_index"]) <= {0, 1, 2}


def test_mixup_cutmix_soft_labels_sum_to_one(fake_imagenet):
    c = _config(fake_imagenet, mix_switch_prob=0.5, repeated_aug=1)
    it = data.create_train_iterator(c, 6, seed=3, process_index=0, process_count=1)
    mixed = 0
    for step, host in enumerate(_take(it, 4)):
        b = device_batch(host, c, 1000, step)
        # 1000 entries, each within 4u (the smoothed constant, 1 - lam, the product, the sum), any order.
        assert_within(b["label"].sum(1), 1.0, gamma_n(1000 + 4), "row sums")
        assert np.all(b["label"] >= 0)
        assert np.all(np.isfinite(b["image"]))
        # Two classes carry weight in mixed rows; the dominant one is label_index.
        top2 = np.sort(b["label"], axis=1)[:, -2:]
        mixed += int(np.sum(top2[:, 0] > 0.01))
        np.testing.assert_array_equal(
            b["label"].argmax(1)[top2[:, 1] > top2[:, 0]], b["label_index"][top2[:, 1] > top2[:, 0]]
        )
    assert mixed > 0


def test_eval_is_deterministic_labelled_and_padded(fake_imagenet):
    fake = fake_imagenet["fake"]
    c = _config(fake_imagenet, return_index=True)
    runs = [list(data.create_eval_iterator(c, 4, 0, 1)) for _ in range(2)]
    assert len(runs[0]) == 2
    for a, b in zip(*runs):
        _assert_batches_equal(a, b)
    b0, b1 = runs[0]
    assert b0["image"].shape == (4, 64, 64, 3) and b0["image"].dtype == np.float32
    assert b0["label"].dtype == np.int32 and b0["mask"].dtype == np.bool_
    np.testing.assert_array_equal(np.concatenate([b0["mask"], b1["mask"]]), [True] * 6 + [False] * 2)
    assert np.all(b1["image"][2:] == 0)
    # Labels equal TFDS's shipped validation labels for those file names.
    val = sources.TfdsSource("imagenet2012", "validation", fake_imagenet["data_dir"])
    expected = dict(zip(sorted(fake.val_files), shipped_validation_wnids(len(fake.val_files))))
    for b in runs[0]:
        for idx, label, m in zip(b["index"], b["label"], b["mask"]):
            if m:
                fname = val.raw(idx)["file_name"].decode()
                assert _names()[label] == expected[fname]


@pytest.mark.parametrize("process_count,batch", [(2, 2), (4, 1)])
def test_eval_shards_cover_split_exactly_once(fake_imagenet, process_count, batch):
    c = _config(fake_imagenet, return_index=True)
    seen, num_batches = [], set()
    for p in range(process_count):
        batches = list(data.create_eval_iterator(c, batch, p, process_count))
        num_batches.add(len(batches))
        for b in batches:
            seen.extend(b["index"][b["mask"]].tolist())
            assert np.all(b["index"][~b["mask"]] == -1)
    assert len(num_batches) == 1  # same number of batches on every process
    assert sorted(seen) == list(range(6))
    assert num_batches.pop() == data.num_eval_batches(c, batch, process_count)


def test_train_shards_disjoint_cover_and_reshuffle(fake_imagenet):
    # The clean validation split (6 images) as a train split, no repeats.
    c = _config(
        fake_imagenet, train_split="validation", repeated_aug=1, return_index=True, mixup_alpha=0.0, cutmix_alpha=0.0
    )
    epochs = {}
    for p in range(2):
        it = data.create_train_iterator(c, 3, seed=7, process_index=p, process_count=2)
        epochs[p] = [next(it)["index"].tolist() for _ in range(4)]  # 4 epochs
    for e in range(4):
        shares = [set(epochs[p][e]) for p in range(2)]
        assert not shares[0] & shares[1]
        assert shares[0] | shares[1] == set(range(6))
    # A new permutation every epoch.
    assert len({tuple(epochs[0][e]) for e in range(4)}) > 1

    # Repeated augmentation: each image 3 times per epoch, on different
    # processes when process_count >= repeats.
    c.repeated_aug = 3
    per_proc = []
    for p in range(3):
        it = data.create_train_iterator(c, 2, seed=7, process_index=p, process_count=3)
        per_proc.append(next(it)["index"].tolist())
    flat = sum(per_proc, [])
    assert len(set(flat)) == 2 and all(flat.count(i) == 3 for i in set(flat))
    for i in set(flat):
        assert sum(i in row for row in per_proc) == 3


def test_restored_iterator_continues_the_same_sequence(fake_imagenet, tmp_path):
    c = _config(fake_imagenet)
    it = data.create_train_iterator(c, 4, seed=1, process_index=0, process_count=1)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 2)
    it2 = data.create_train_iterator(c, 4, seed=1, process_index=0, process_count=1)
    it2.set_state(state)
    for a, b in zip(expected, _take(it2, 2)):
        _assert_batches_equal(a, b)

    # Through orbax with grain's own checkpoint handler.
    import orbax.checkpoint as ocp

    it3 = data.create_train_iterator(c, 4, seed=1, process_index=0, process_count=1)
    _take(it3, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it3)))
        mngr.wait_until_finished()
    it4 = data.create_train_iterator(c, 4, seed=1, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it4)))
    _assert_batches_equal(expected[0], next(it4))


def test_worker_processes_give_the_same_batches(fake_imagenet):
    c = _config(fake_imagenet, image_size=32)
    ref = _take(data.create_train_iterator(c, 2, seed=5, process_index=0, process_count=1), 3)
    c.num_workers = 2
    it = data.create_train_iterator(c, 2, seed=5, process_index=0, process_count=1)
    try:
        got = [next(it)]
        state = it.get_state()
        got += _take(it, 2)
    finally:
        it.close()
    for a, b in zip(ref, got):
        _assert_batches_equal(a, b)
    # Resuming with workers continues the same sequence too.
    it2 = data.create_train_iterator(c, 2, seed=5, process_index=0, process_count=1)
    try:
        it2.set_state(state)
        _assert_batches_equal(ref[1], next(it2))
    finally:
        it2.close()


def test_corrupt_images_are_skipped_and_counted(fake_imagenet):
    fake = fake_imagenet["fake"]
    c = _config(fake_imagenet, repeated_aug=1, return_index=True)
    train = sources.TfdsSource("imagenet2012", "train", fake_imagenet["data_dir"])
    corrupt = {i for i in range(len(train)) if train.raw(i)["file_name"].decode() in fake.corrupt_files}
    assert len(corrupt) == 2
    data.reset_data_stats()
    it = data.create_train_iterator(c, 4, seed=0, process_index=0, process_count=1)
    batches = _take(it, 6)  # two epochs of 12
    used = np.concatenate([b["index"] for b in batches])
    assert not set(used.tolist()) & corrupt
    stats = data.data_stats()
    assert stats["train_examples"] == 24
    assert stats["train_skipped"] >= 4  # each corrupt file once per epoch

    # Eval over the train split: corrupt files are masked out and counted.
    ev = list(data.create_eval_iterator(c, 5, 0, 1, split="train"))
    mask = np.concatenate([b["mask"] for b in ev])
    index = np.concatenate([b["index"] for b in ev])
    assert sorted(index[~mask & (index >= 0)].tolist()) == sorted(corrupt)
    assert data.data_stats()["eval_undecodable"] == 2
    assert data.data_stats()["eval_examples"] == 10


def test_missing_or_incomplete_manual_dir_names_the_files(tmp_path, capsys):
    with pytest.raises(prepare.ManualDirError) as e:
        prepare.check_manual_dir("imagenet2012", str(tmp_path))
    msg = str(e.value)
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert str(tmp_path) in msg
    # Incomplete: only the val tar, and a broken train "tar".
    (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"partial")
    import tarfile

    with tarfile.open(tmp_path / "ILSVRC2012_img_val.tar", "w"):
        pass
    with pytest.raises(prepare.ManualDirError) as e:
        prepare.check_manual_dir("imagenet2012", str(tmp_path))
    assert "not a tar archive" in str(e.value)
    assert "ILSVRC2012_img_val.tar" not in str(e.value).split("manual dir")[1]
    # The command line exits with status 1 and prints the message.
    assert prepare.main(["--dataset=imagenet2012", f"--manual_dir={tmp_path}/x", f"--data_dir={tmp_path}/d"]) == 1
    assert "ILSVRC2012_img_train.tar" in capsys.readouterr().err


def test_unprepared_data_dir_says_how_to_prepare(tmp_path):
    c = data.default_data_config("imagenet2012")
    c.data_dir = str(tmp_path)
    with pytest.raises(data.DatasetNotPreparedError, match="python -m bvit_jax.data.prepare"):
        data.create_train_iterator(c, 2, process_index=0, process_count=1)


def test_reading_does_not_import_tensorflow(fake_imagenet):
    code = textwrap.dedent(f"""
      import sys
      from bvit_jax import data
      c = data.default_data_config('imagenet2012')
      c.data_dir = {fake_imagenet["data_dir"]!r}
      c.image_size = 32
      b = next(data.create_train_iterator(c, 2, 0, 0, 1))
      assert b['image'].shape == (2, 32, 32, 3)
      assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
      print('ok')
  """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout
