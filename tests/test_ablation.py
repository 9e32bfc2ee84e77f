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


def test_sweep_prints_its_plan_resumes_across_invocations_and_writes_results_json(tmp_path):
    first = _sweep(tmp_path, "fp")
    assert _plan(first) == {"fp_s0": "4/4"}
    assert "expected:" in first and "no step time measured yet" in first
    # A second invocation with more presets: the finished fp run is kept (0 steps left) and
    # its logged step time prices the plan; the new run is planned in full.
    second = _sweep(tmp_path, "fp,baseline")
    assert _plan(second) == {"fp_s0": "0/4", "baseline_s0": "4/4"}
    walls = json.loads((tmp_path / "runs" / "wall_times.json").read_text())
    assert set(walls) == {"fp_s0", "baseline_s0"}
    doc = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert doc["regime"] == "tiny" and doc["split"] == "test"
    for preset in ("fp", "baseline"):
        metrics = [json.loads(line) for line in (tmp_path / "runs" / f"{preset}_s0" / "metrics.jsonl").open()]
        final = [r["top1"] for r in metrics if r["split"] == "eval"][-1]
        assert doc["presets"][preset] == {"seeds": [0], "top1": [round(final * 100, 4)]}


def test_a_shared_teacher_is_trained_once_and_every_seed_distils_from_it(tmp_path):
    out = _sweep(tmp_path, "baseline", "--seeds=1,2", "--teacher_seed=0")
    assert _plan(out) == {"fp_s0": "4/4", "baseline_s1": "4/4", "baseline_s2": "4/4"}  # no fp_s1, fp_s2
    trained = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert trained == ["baseline_s1", "baseline_s2", "fp_s0"]
    for seed in (1, 2):
        config = json.loads((tmp_path / "runs" / f"baseline_s{seed}" / "config.json").read_text())
        assert config["seed"] == seed
        assert config["distill"]["teacher_workdir"] == str(tmp_path / "runs" / "fp_s0")
