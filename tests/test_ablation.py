"""The study's sweep tool (benchmarks/ablation.py): cost plan, resume across invocations, results.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.train_helpers import ROOT, run_env

SIZE = "w48_d1"  # a model size of the sweep tool (benchmarks/ablation.py --sizes): its own folder and report
TINY = [
    "--config.total_steps=4",
    "--config.warmup_steps=1",
    "--config.global_batch_size=32",
    "--config.eval_batch_size=200",
    "--config.data.eval_split=test[:400]",
    "--config.model.overrides.embed_dim=32",
    "--config.model.overrides.depth=1",
    "--config.model.overrides.num_heads=2",
    "--config.diagnostics_every_steps=4",
]


def _sweep(tmp_path, presets: str, *flags: str) -> str:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "ablation.py"),
        f"--out={tmp_path / 'runs'}",
        f"--docs={tmp_path / 'docs'}",
        f"--presets={presets}",
        "--regime=tiny",
        *(flags or ["--seeds=0"]),
        "--",
        *TINY,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _plan(stdout: str) -> dict[str, str]:
    """``{run: 'steps left/total'}`` from the plan the tool prints before training."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and "/" in parts[1] and re.search(r"_s\d+$", parts[0]):
            rows[parts[0]] = parts[1]
    return rows


def _check_results(tmp_path, presets: list[str], seeds: list[int], size: str = SIZE) -> None:
    """results.json of the last invocation: the regime, the split and each seed's final eval top-1 in %."""
    doc = json.loads((tmp_path / "docs" / size / "results.json").read_text())
    assert doc["regime"] == f"tiny {size}" and doc["split"] == "test"
    for preset in presets:
        final = []
        for seed in seeds:
            rows = [
                json.loads(line) for line in (tmp_path / "runs" / size / f"{preset}_s{seed}" / "metrics.jsonl").open()
            ]
            final.append(round([r["top1"] for r in rows if r["split"] == "eval"][-1] * 100, 4))
        assert doc["presets"][preset] == {"seeds": seeds, "top1": final}


def _records(out) -> dict[str, list[dict]]:
    """``{run: [record, ...]}`` from the sweep's runs.jsonl (one record per ended child, in order)."""
    recs: dict[str, list[dict]] = {}
    for line in (out / "runs.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs.setdefault(r["run"], []).append(r)
    return recs


TIMINGS = re.compile(r"time|wait|img_per_s|eta_s")  # metrics that measure the machine, not the run


def _final_rows(wd) -> tuple[dict, dict, int]:
    """The last train row and the last eval row (without timings) and the number of train rows of a
    workdir's metrics.jsonl."""
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").open()]
    rows = [{k: v for k, v in r.items() if not TIMINGS.search(k)} for r in rows]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    return train[-1], evals[-1], len(train)


def test_parallel_sweep_waits_for_teachers_matches_sequential_resumes_and_shares_a_teacher(tmp_path):
    """``--parallel=2`` at a size (``w48_d1``, its own folder): both teachers train at once, each student
    starts after its own teacher ended, the size reaches the model, each run logs to its train.log (not
    to stdout), results.json holds each run's top-1. A second folder: the teacher of seed 1 alone, one
    run at a time, gives the parallel run's metrics (CPU runs are deterministic); then a rerun there with
    two students sharing that teacher (``--teacher_seed=1``, seeds 1 and 2) keeps the finished teacher
    (0 steps left, no new train rows, no fp_s2), starts the students after it, and its student of seed 1
    equals the parallel sweep's."""
    par = tmp_path / "par"
    out = _sweep(par, "fp,baseline", "--seeds=0,1", f"--sizes={SIZE}", "--parallel=2")
    assert _plan(out) == {f"{SIZE}/{p}_s{s}": "4/4" for s in (0, 1) for p in ("fp", "baseline")}
    assert "expected:" in out and "no step time measured yet" in out
    assert "with 2 at once:" in out and "final eval" not in out
    rec = {name: r[0] for name, r in _records(par / "runs").items()}
    assert all(r["returncode"] == 0 for r in rec.values())
    fp0, fp1 = rec[f"{SIZE}/fp_s0"], rec[f"{SIZE}/fp_s1"]
    assert fp0["start"] < fp1["end"] and fp1["start"] < fp0["end"], "the two teachers did not overlap"
    for seed in (0, 1):
        assert rec[f"{SIZE}/baseline_s{seed}"]["start"] >= rec[f"{SIZE}/fp_s{seed}"]["end"]
    size_dir = par / "runs" / SIZE
    for wd in size_dir.glob("*_s[01]"):
        config = json.loads((wd / "config.json").read_text())
        assert (config["model"]["overrides"]["embed_dim"], config["model"]["overrides"]["depth"]) == (48, 1)
        assert "final eval" in (wd / "train.log").read_text()
    _check_results(par, ["fp", "baseline"], [0, 1])

    seq = tmp_path / "seq"
    _sweep(seq, "fp", "--seeds=1", f"--sizes={SIZE}", "--parallel=1")
    seq_dir = seq / "runs" / SIZE
    assert _final_rows(seq_dir / "fp_s1")[:2] == _final_rows(size_dir / "fp_s1")[:2]
    teacher_rows = _final_rows(seq_dir / "fp_s1")[2]

    again = _sweep(seq, "baseline", "--seeds=1,2", "--teacher_seed=1", f"--sizes={SIZE}", "--parallel=2")
    assert _plan(again) == {f"{SIZE}/fp_s1": "0/4", f"{SIZE}/baseline_s1": "4/4", f"{SIZE}/baseline_s2": "4/4"}
    assert _final_rows(seq_dir / "fp_s1")[2] == teacher_rows, "the finished teacher trained again"
    assert sorted(p.name for p in seq_dir.iterdir() if p.is_dir()) == ["baseline_s1", "baseline_s2", "fp_s1"]
    rec = _records(seq / "runs")
    assert len(rec[f"{SIZE}/fp_s1"]) == 2
    for seed in (1, 2):
        assert rec[f"{SIZE}/baseline_s{seed}"][0]["start"] >= rec[f"{SIZE}/fp_s1"][1]["end"]
        config = json.loads((seq_dir / f"baseline_s{seed}" / "config.json").read_text())
        assert config["seed"] == seed and config["distill"]["teacher_workdir"] == str(seq_dir / "fp_s1")
    assert set(json.loads((seq_dir / "wall_times.json").read_text())) == {"fp_s1", "baseline_s1", "baseline_s2"}
    assert _final_rows(seq_dir / "baseline_s1")[:2] == _final_rows(size_dir / "baseline_s1")[:2]
    _check_results(seq, ["baseline"], [1, 2])


def test_schedule_estimate_respects_slots_and_teachers():
    """The plan's wall-time estimate: two teachers (10 s) then their students (5 s) in two slots take
    15 s, in one slot 30 s; a student never starts before its teacher ends, even with free slots."""
    from benchmarks.ablation import schedule_seconds

    seconds = {"fp_s0": 10.0, "baseline_s0": 5.0, "fp_s1": 10.0, "baseline_s1": 5.0}
    needs = {"baseline_s0": "fp_s0", "baseline_s1": "fp_s1"}
    assert schedule_seconds(seconds, needs, 2) == 15.0
    assert schedule_seconds(seconds, needs, 1) == 30.0
    assert schedule_seconds(seconds, needs, 4) == 15.0
    assert (
        schedule_seconds(
            {"fp_s0": 10.0, "baseline_s0": 5.0, "binaryvit_s0": 5.0},
            {"baseline_s0": "fp_s0", "binaryvit_s0": "fp_s0"},
            3,
        )
        == 15.0
    )
