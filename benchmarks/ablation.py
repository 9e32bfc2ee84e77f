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

The report, written after the runs (``--report_only``: only the report, no
training), is ``results.md`` and the figures ``fig_*.png`` in ``--docs``
(default ``docs/``), from the workdirs' ``metrics.jsonl`` and final
checkpoints. Extra ``train.py`` flags for every run go after ``--``, e.g.
``-- --config.total_epochs=3``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bvit_jax import cli  # noqa: E402
from bvit_jax.errors import UserError  # noqa: E402

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


def _define_flags(fv, argv: list[str]) -> None:
    del argv
    from absl import flags

    flags.DEFINE_string("out", "workdirs/ablation", "Directory of the runs' workdirs.", flag_values=fv)
    flags.DEFINE_list("seeds", "0,1,2", "Comma-separated seeds.", flag_values=fv)
    flags.DEFINE_list("presets", ",".join(PRESETS), "Comma-separated presets.", flag_values=fv)
    flags.DEFINE_enum(
        "split",
        "test",
        ["test", "val"],
        "test: train on train, evaluate on test; val: train[:90%] / train[90%:].",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "grs_strengths",
        "",
        "Comma-separated GRS lambdas: also train baseline+grs with each (tuning, with --split=val).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "report_only", False, "Only write the report from existing workdirs (no training).", flag_values=fv
    )
    flags.DEFINE_string("docs", str(ROOT / "docs"), "Where the report (results.md, fig_*.png) goes.", flag_values=fv)


def _run(fv, extra: list[str]) -> int:
    """``extra``: the arguments after ``--``, extra train.py flags for every run (e.g. --config.total_epochs=3)."""
    try:
        seeds = [int(s) for s in fv["seeds"].value]
        strengths = [float(v) for v in fv["grs_strengths"].value if v]
    except ValueError as e:
        raise UserError(f"--seeds / --grs_strengths: {e}") from None
    ablation(
        Path(fv["out"].value),
        seeds,
        fv["presets"].value,
        fv["split"].value,
        strengths,
        report_only=fv["report_only"].value,
        docs=Path(fv["docs"].value),
        extra=list(extra),
    )
    return 0


def ablation(
    out: Path,
    seeds: list[int],
    presets: list[str],
    split: str,
    strengths: list[float],
    *,
    report_only: bool,
    docs: Path,
    extra: list[str],
) -> None:
    """Train the runs (unless ``report_only``), then write the report into ``docs``."""
    walls = {}
    if not report_only:
        for seed in seeds:
            for preset in ["fp"] + [p for p in presets if p != "fp"]:
                walls[run_name(preset, seed)] = train(out, preset, seed, split, extra)
            for lam in strengths:
                name = grs_run_name(lam, seed)
                walls[name] = train(
                    out, "baseline+grs", seed, split, extra + [f"--config.grs.strength={lam}"], name=name
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
    write_report(out, presets, seeds, docs, split=split, machine=f"{cpu_model()}, {os.cpu_count()} cores")


main = cli.command("benchmarks/ablation.py", __doc__, _define_flags, _run)


if __name__ == "__main__":
    sys.exit(main())
