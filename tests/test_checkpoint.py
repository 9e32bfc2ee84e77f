"""The checkpoint store (:mod:`bvit_jax.runs.checkpoint`), driven by the trainer: an intact checkpoint of
another config is a mismatch (not damage), a corrupt latest checkpoint falls back to the previous one,
and when none restores the run refuses to start from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest

from bvit_jax.runs.checkpoint import CheckpointError, CheckpointMismatchError
from bvit_jax.train.metric_writers import read_metrics
from bvit_jax.train.trainer import train_and_evaluate
from tests.train_helpers import tiny_config


def test_checkpoint_of_another_config_is_a_mismatch_not_damage(tmp_path):
    train_and_evaluate(tiny_config("fp", total_steps=4), tmp_path)
    config_json = (tmp_path / "config.json").read_text()
    cfg = tiny_config("fp", total_steps=8)
    cfg.model.overrides = dict(embed_dim=48, depth=1, num_heads=2)
    with pytest.raises(CheckpointMismatchError) as err:
        train_and_evaluate(cfg, tmp_path)
    msg = str(err.value)
    assert "is intact" in msg and "use a new --workdir" in msg
    assert "params/blocks/0/attn/q/linear/kernel: checkpoint (32, 32), config (48, 48)" in msg
    assert "model.overrides.embed_dim: 32 -> 48" in msg and "total_steps: 4 -> 8" in msg
    assert "damaged" not in msg and "Move the damaged" not in msg
    # Nothing was set aside or overwritten: the checkpoint and the run's config.json are as they were.
    assert not (tmp_path / "damaged_checkpoints").exists()
    assert (tmp_path / "config.json").read_text() == config_json
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]


def _corrupt(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 8)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    cfg = tiny_config("fp", total_steps=8, checkpoint_every_steps=4)
    train_and_evaluate(cfg, tmp_path)
    uninterrupted = {r["step"]: r["loss"] for r in read_metrics(tmp_path, "train")}
    _corrupt(tmp_path / "checkpoints" / "8")
    with caplog.at_level("ERROR"):  # the same config: the run is to end at step 8 again
        train_and_evaluate(cfg, tmp_path)
    assert "step 8" in caplog.text and "cannot be restored" in caplog.text
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == list(range(1, 9))  # resumed at 4, not from scratch
    # Steps 5-8 again from step 4's state, data position and schedule: the first run's losses, bit for bit.
    assert {r["step"]: r["loss"] for r in rows if 4 < r["step"] <= 8} == {s: uninterrupted[s] for s in range(5, 9)}


def test_all_checkpoints_corrupt_refuses_to_start_from_scratch(tmp_path):
    cfg = tiny_config("fp", total_steps=8, checkpoint_every_steps=4)
    train_and_evaluate(cfg, tmp_path)
    for step in ("4", "8"):
        _corrupt(tmp_path / "checkpoints" / step)
    mtime = (tmp_path / "metrics.jsonl").stat().st_mtime
    cfg.total_steps = 12
    with pytest.raises(CheckpointError, match="Refusing to start from scratch"):
        train_and_evaluate(cfg, tmp_path)
    assert (tmp_path / "metrics.jsonl").stat().st_mtime == mtime
