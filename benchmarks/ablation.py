"""The ablation behind docs/results.md: five presets x seeds on Fashion-MNIST, with the project's trainer.

    python benchmarks/ablation.py --seeds=0,1,2 --out=workdirs/ablation          # train + report
    python benchmarks/ablation.py --seeds=0,1,2 --out=workdirs/ablation --report_only
    python benchmarks/ablation.py --split=val --seeds=0 --out=workdirs/tuning \
        --grs_strengths=3e-4,1e-3 --docs=workdirs/tuning/docs                     # tuning on validation

Every run is ``train.py --config=configs/fashion_mnist.py:PRESET`` (a subprocess,
exactly what a user runs); binary presets distil from the ``fp`` teacher of the
same seed. ``--split=val`` trains on ``train[:90%]`` and evaluates on
``train[90%:]`` (for tuning); ``--split=test`` (default) trains on the full
training set and evaluates on the test set. Finished runs are not repeated
(the trainer resumes a finished workdir by re-evaluating it).

The report (``--report``, on by default) writes ``docs/results.md`` and the
figures ``docs/fig_*.png`` from the workdirs' ``metrics.jsonl`` and final
checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("fp", "baseline", "baseline+grs", "baseline+asm", "binaryvit")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_name(preset: str, seed: int) -> str:
    return f"{preset.replace('+', '_')}_s{seed}"


def grs_run_name(strength: float, seed: int) -> str:
    return f"baseline_grs_lam{strength:.0e}_s{seed}"


def train(out: Path, preset: str, seed: int, split: str, extra: list[str], name: str | None = None) -> float:
    """One ``train.py`` run into ``out/name`` (default `run_name`); returns its wall time in seconds."""
    wd = out / (name or run_name(preset, seed))  # a finished workdir is only re-evaluated by the trainer
    flags = [f"--config={ROOT / 'configs' / 'fashion_mnist.py'}:{preset}", f"--workdir={wd}", f"--config.seed={seed}"]
    if split == "val":
        flags += ["--config.data.train_split=train[:90%]", "--config.data.eval_split=train[90%:]"]
    if preset != "fp":
        flags.append(f"--config.distill.teacher_workdir={out / run_name('fp', seed)}")
    t0 = time.time()
    print("+ train.py", " ".join(flags[1:] + extra), flush=True)
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *flags, *extra], check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="workdirs/ablation")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument(
        "--grs_strengths",
        default="",
        help="comma-separated GRS lambdas: also train baseline+grs with each (tuning, with --split=val)",
    )
    ap.add_argument("--report_only", action="store_true")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("extra", nargs="*", help="extra train.py flags for every run, e.g. --config.total_epochs=3")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    presets = args.presets.split(",")
    strengths = [float(v) for v in args.grs_strengths.split(",") if v]
    walls = {}
    if not args.report_only:
        for seed in seeds:
            for preset in ["fp"] + [p for p in presets if p != "fp"]:
                walls[run_name(preset, seed)] = train(out, preset, seed, args.split, args.extra)
            for lam in strengths:
                name = grs_run_name(lam, seed)
                walls[name] = train(
                    out, "baseline+grs", seed, args.split, args.extra + [f"--config.grs.strength={lam}"], name=name
                )
        (out / "wall_times.json").write_text(json.dumps(walls, indent=1))
    from benchmarks.ablation_report import write_report, write_tuning_table

    if strengths:
        write_tuning_table(
            out,
            {f"baseline+grs, lambda={lam:g}": [out / grs_run_name(lam, s) for s in seeds] for lam in strengths},
            presets,
            seeds,
        )
    write_report(
        out, presets, seeds, Path(args.docs), split=args.split, machine=f"{cpu_model()}, {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
