"""benchmarks/tuning_table.py: the docs' tuning rows from a run's metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import tuning_table


def _write_run(wd, *, diagnostics: bool):
    """A 1,000-step run: eval every 100 steps (top-1 = step / 2,000), train rows every 50 steps with a flip
    rate of step * 1e-6, and (optionally) two diagnostics rows, the last one the run's final state."""
    wd.mkdir()
    rows = []
    for step in range(50, 1001, 50):
        rows.append(
            {
                "step": step,
                "split": "train",
                "flip_rate/all": step * 1e-6,
                "never_flipped/all": 0.25,
                "silent/all": 0.5,
                "outside_window/all": 0.0,
            }
        )
        if step % 100 == 0:
            rows.append({"step": step, "split": "eval", "top1": step / 2000})
    if diagnostics:
        rows.append(
            {
                "step": 500,
                "split": "diagnostics",
                "bimodality/mean": 0.1,
                "act_entropy/mean": 0.2,
                "act_token_entropy/mean": 0.3,
            }
        )
        rows.append(
            {
                "step": 1000,
                "split": "diagnostics",
                "bimodality/mean": 0.6,
                "act_entropy/mean": 0.9,
                "act_token_entropy/mean": 0.99,
            }
        )
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_read_the_curve_at_each_fifth_the_late_flip_rate_and_the_final_diagnostics(tmp_path, capsys):
    _write_run(tmp_path / "binaryvit_s0", diagnostics=True)
    _write_run(tmp_path / "fp_s0", diagnostics=False)
    out = tmp_path / "rows.json"
    assert tuning_table.main([str(tmp_path / "binaryvit_s0"), str(tmp_path / "fp_s0"), f"--json={out}"]) == 0
    rows = json.loads(out.read_text())
    r = rows[0]
    assert r["top1_curve"] == pytest.approx([10.0, 20.0, 30.0, 40.0, 50.0])  # steps 200, 400, ..., 1000
    # Train rows after 80 % of the last step (850, 900, 950, 1000): their mean flip rate.
    assert r["flip_rate_late"] == pytest.approx(np.mean([850, 900, 950, 1000]) * 1e-6)
    assert (r["bimodality"], r["entropy_channel"], r["entropy_token"]) == (0.6, 0.9, 0.99)  # the last row
    assert (r["never flipped"], r["silent"], r["abs(W) > 1"]) == (25.0, 50.0, 0.0)
    assert rows[1]["bimodality"] != rows[1]["bimodality"]  # nan: no diagnostics
    # A markdown table: every line has as many cell separators as the header (no stray "|" in a name).
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and len({line.count("|") for line in lines}) == 1
    assert lines[2] == (
        "| binaryvit_s0 | 10.00 / 20.00 / 30.00 / 40.00 / **50.00** | 9.25e-04 | 0.600 | 0.900 / 0.990 "
        "| 25.0 | 50.0 | 0.0 |"
    )
    assert lines[3].count("–") == 3  # bimodality and both entropies


def test_a_run_without_eval_rows_is_refused_with_its_folder_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="empty: no eval rows"):
        tuning_table.main([str(tmp_path / "empty")])
