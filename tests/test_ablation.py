"""The study's sweep tool (benchmarks/ablation.py): cost plan, resume across invocations, results.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.train_helpers import ROOT, run_env

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


def test_sweep_plans_resumes_shares_its_teacher_and_writes_results_json(tmp_path):
    """Two invocations on one folder: the first trains fp; the second, a binary preset on two seeds
    with ``--teacher_seed=0``, keeps the finished fp run (0 steps left; its logged step time prices the
    plan) as the one teacher of both seeds (no fp_s1, fp_s2); results.json holds each run's top-1."""
    first = _sweep(tmp_path, "fp")
    assert _plan(first) == {"fp_s0": "4/4"}
    assert "expected:" in first and "no step time measured yet" in first
    _check_results(tmp_path, "fp", [0])
    second = _sweep(tmp_path, "baseline", "--seeds=1,2", "--teacher_seed=0")
    assert _plan(second) == {"fp_s0": "0/4", "baseline_s1": "4/4", "baseline_s2": "4/4"}
    trained = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert trained == ["baseline_s1", "baseline_s2", "fp_s0"]
    walls = json.loads((tmp_path / "runs" / "wall_times.json").read_text())
    assert set(walls) == {"fp_s0", "baseline_s1", "baseline_s2"}
    for seed in (1, 2):
        config = json.loads((tmp_path / "runs" / f"baseline_s{seed}" / "config.json").read_text())
        assert config["seed"] == seed
        assert config["distill"]["teacher_workdir"] == str(tmp_path / "runs" / "fp_s0")
    _check_results(tmp_path, "baseline", [1, 2])


def _check_results(tmp_path, preset: str, seeds: list[int]) -> None:
    """results.json of the last invocation: the regime, the split and each seed's final eval top-1 in %."""
    doc = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert doc["regime"] == "tiny" and doc["split"] == "test"
    final = []
    for seed in seeds:
        rows = [json.loads(line) for line in (tmp_path / "runs" / f"{preset}_s{seed}" / "metrics.jsonl").open()]
        final.append(round([r["top1"] for r in rows if r["split"] == "eval"][-1] * 100, 4))
    assert doc["presets"][preset] == {"seeds": seeds, "top1": final}
