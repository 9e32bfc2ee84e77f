"""Run folders in a bucket (:mod:`bvit_jax.runs.storage`), against a real GCS emulator on loopback: atomic
small files, and metrics and TensorBoard in the bucket. Training, stopping and resuming runs in a bucket, on
one process and two, are in tests/test_preemption.py."""

from __future__ import annotations

import pytest

from bvit_jax.runs import storage
from bvit_jax.train.metric_writers import MetricWriter, read_metrics

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
