"""Run folders in a bucket (:mod:`bvit_jax.storage`), against a real GCS emulator on loopback: atomic
small files, metrics and TensorBoard in the bucket, a binary run with its teacher trained, saved and restored
through the bucket bitwise equal to the local run.

Not covered here: a save-stop-resume cycle in the bucket. Against fake-gcs-server the third orbax save of
a process hangs inside gcsfs (``epath.exists`` waiting on a request that never completes), and the
pure-Python gcp-storage-emulator sends no ``x-goog-generation`` header, which TensorStore's OCDBT manifest
reads need; resume is tested on local disk (tests/test_preemption.py, tests/test_multihost.py)."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

from bvit_jax import storage
from bvit_jax.metric_writers import MetricWriter, read_metrics
from bvit_jax.workdir import load_config, restore_params
from tests.train_helpers import ROOT, flat, run_train

STEPS = 8
FLAGS = [
    f"--config.total_steps={STEPS}",
    "--config.global_batch_size=16",
    "--config.checkpoint_every_steps=4",
    "--config.keep_checkpoints=5",
    "--config.eval_every_steps=4",
    "--config.log_every_steps=1",
    "--config.diagnostics_every_steps=0",
]


def test_atomic_write_leaves_the_old_file_whole_when_the_write_fails(tmp_path):
    path = tmp_path / "config.json"
    storage.atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        storage.atomic_write_text(path, b"not text")  # fails inside the write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left


def test_metrics_and_tensorboard_go_to_the_bucket_and_a_resume_truncates_them(gcs):
    wd = gcs.url("metrics_run")
    w = MetricWriter(wd, total_steps=4, progress_bar=False)
    for step in range(1, 5):
        w.write(step, "train", {"loss": 1.0 / step})
    w.close()
    assert [r["loss"] for r in read_metrics(wd)] == [1.0, 0.5, 1 / 3, 0.25]
    events = list((storage.as_path(wd) / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"train/loss" in events[0].read_bytes()
    MetricWriter(wd, total_steps=4, start_step=2, progress_bar=False).close()  # resumed from step 2
    assert [r["step"] for r in read_metrics(wd)] == [1, 2]


def test_a_binary_run_in_the_bucket_with_its_teacher_there_equals_the_local_run(gcs, teacher, tmp_path):
    """Train, save and restore through the bucket: the same losses and parameters, bitwise, as on local disk."""
    fsspec.filesystem("gcs").put(str(teacher), gcs.url("teacher"), recursive=True)
    flags = [
        "--config.total_steps=4",
        "--config.global_batch_size=16",
        "--config.checkpoint_every_steps=4",
        "--config.eval_every_steps=4",
        "--config.log_every_steps=1",
        "--config.diagnostics_every_steps=0",
    ]
    run_train(tmp_path / "local", "binaryvit,tiny", *flags, f"--config.distill.teacher_workdir={teacher}")
    run_train(gcs.url("bvit"), "binaryvit,tiny", *flags, f"--config.distill.teacher_workdir={gcs.url('teacher')}")
    assert load_config(gcs.url("bvit"))["distill"]["teacher_workdir"] == gcs.url("teacher")
    assert not (ROOT / "gs:").exists()  # nothing folded into a local 'gs:' folder
    assert [r["loss"] for r in read_metrics(gcs.url("bvit"), "train")] == [
        r["loss"] for r in read_metrics(tmp_path / "local", "train")
    ]
    for which in ("latest", "best"):
        a = flat(restore_params(tmp_path / "local", which)[1])
        b = flat(restore_params(gcs.url("bvit"), which)[1])
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{which} {k}")
