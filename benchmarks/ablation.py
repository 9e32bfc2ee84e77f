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

Before training it prints the plan: the steps left in each run (from its
resolved config and its workdir's latest checkpoint) and the expected time,
from the step times this sweep's runs have logged so far. Stopped at any
point (Ctrl-C, a preempted VM), the same command resumes: finished runs are
kept (only re-evaluated), unfinished ones resume from their checkpoints, and
``wall_times.json`` accumulates. The runs use whatever JAX backend is
installed (a GPU when ``jax[cuda12]`` is), nothing in the tool is CPU-specific.
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


def run_flags(
    out: Path,
    preset: str,
    seed: int,
    split: str,
    extra: list[str],
    name: str | None = None,
    teacher_seed: int | None = None,
) -> list[str]:
    """The ``train.py`` flags of one run into ``out/name`` (default `run_name`).

    A binary preset distils from the ``fp`` run of ``teacher_seed`` (default:
    its own seed).
    """
    wd = out / (name or run_name(preset, seed))
    flags = [f"--config={ROOT / 'configs' / 'fashion_mnist.py'}:{preset}", f"--workdir={wd}", f"--config.seed={seed}"]
    if split == "val":
        flags += ["--config.data.train_split=train[:90%]", "--config.data.eval_split=train[90%:]"]
    if preset != "fp":
        teacher = seed if teacher_seed is None else teacher_seed
        flags.append(f"--config.distill.teacher_workdir={out / run_name('fp', teacher)}")
    return flags + list(extra)


def train(flags: list[str]) -> float:
    """One ``train.py`` run (a subprocess, exactly what a user runs); returns its wall time in seconds.

    The trainer resumes an interrupted workdir from its latest checkpoint and
    only re-evaluates a finished one, so a sweep can be stopped and restarted.
    """
    t0 = time.time()
    print("+ train.py", " ".join(flags[1:]), flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - t0


def add_wall_time(path: Path, name: str, seconds: float) -> None:
    """Add ``seconds`` to run ``name`` in the JSON file ``path`` (read just before the write).

    Times accumulate over invocations, so an interrupted sweep keeps what it
    measured, and invocations sharing one output folder merge their entries.
    """
    walls = json.loads(path.read_text()) if path.exists() else {}
    walls[name] = walls.get(name, 0.0) + seconds
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(walls, indent=1))
    tmp.replace(path)


def run_plan(flags: list[str]) -> dict:
    """What is left of one run: ``{'steps', 'done', 'sec_per_step'}`` from its config and workdir.

    The config is resolved exactly as ``train.py`` resolves it (the config
    file, then the ``--config.*`` overrides); ``done`` is the workdir's latest
    checkpoint step; ``sec_per_step`` the median measured step time of the
    run's preset in this sweep's workdirs (None before one has logged).
    """
    from absl import flags as absl_flags
    from ml_collections import config_flags

    from bvit_jax import data
    from bvit_jax.train.trainer import steps_from

    fv = absl_flags.FlagValues()
    argv = ["train.py", *flags]
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    absl_flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv, known_only=True)
    config, wd = fv["config"].value, Path(fv["workdir"].value)
    steps = steps_from(config, "total", data.dataset_info(config.data).num_train / config.global_batch_size)
    done = max((int(p.name) for p in (wd / "checkpoints").glob("[0-9]*")), default=0)
    return {"steps": steps, "done": min(done, steps), "preset": config.model.preset, "batch": config.global_batch_size}


def step_seconds(out: Path) -> dict[str, float]:
    """Median seconds per train step by preset, from the ``img_per_s`` logged by this sweep's runs."""
    from bvit_jax.runs.workdir import load_config
    from bvit_jax.train.metric_writers import read_metrics

    rates: dict[str, list[float]] = {}
    for wd in out.glob("*/metrics.jsonl"):
        config = load_config(wd.parent)
        rows = [r["img_per_s"] for r in read_metrics(wd.parent, "train")[1:] if r.get("img_per_s")]
        rates.setdefault(config["model"]["preset"], []).extend(config["global_batch_size"] / r for r in rows)
    return {p: sorted(v)[len(v) // 2] for p, v in rates.items() if v}


def print_cost(plans: dict[str, dict], sec: dict[str, float]) -> None:
    """The sweep's expected cost before it starts: steps left per run, and time where a step time is known."""
    total, unknown = 0.0, []
    print(f"{'run':40s} {'steps left':>11s} {'expected':>10s}")
    for name, p in plans.items():
        left = p["steps"] - p["done"]
        t = sec.get(p["preset"])
        if left and t is None:
            unknown.append(p["preset"])
        total += left * (t or 0.0)
        when = "-" if not left else ("?" if t is None else f"{left * t / 60:.1f} min")
        print(f"{name:40s} {left:>6d}/{p['steps']:<4d} {when:>10s}")
    note = f" + runs of {sorted(set(unknown))} (no step time measured yet)" if unknown else ""
    print(f"expected: {total / 60:.1f} min of training (compile and evaluation not included){note}", flush=True)


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
    flags.DEFINE_integer(
        "teacher_seed",
        None,
        "Every student distils from the fp run of this seed (trained first); default: the fp run of its own seed.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "report_only", False, "Only write the report from existing workdirs (no training).", flag_values=fv
    )
    flags.DEFINE_string(
        "docs", str(ROOT / "docs"), "Where the report (results.md, results.json, fig_*.png) goes.", flag_values=fv
    )
    flags.DEFINE_string(
        "regime",
        "",
        "Name of the study regime recorded in results.json (default: the config and extra flags).",
        flag_values=fv,
    )


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
        regime=fv["regime"].value,
        teacher_seed=fv["teacher_seed"].value,
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
    regime: str = "",
    teacher_seed: int | None = None,
) -> None:
    """Train the runs (unless ``report_only``), then write the report into ``docs``.

    Run order: for each seed its ``fp`` run (when ``fp`` is in ``presets``),
    then its students; a shared teacher (``teacher_seed``) is trained first.
    Several invocations may share one ``out`` (e.g. one per CPU core, on
    disjoint presets or seeds): the wall times are merged, not overwritten.
    """
    if not report_only:
        runs = {}
        if teacher_seed is not None and any(p != "fp" for p in presets):
            runs[run_name("fp", teacher_seed)] = run_flags(out, "fp", teacher_seed, split, extra)
        for seed in seeds:
            own_teacher = teacher_seed is None  # then every seed needs its fp run, listed or not
            for preset in ["fp"] * ("fp" in presets or own_teacher) + [p for p in presets if p != "fp"]:
                runs[run_name(preset, seed)] = run_flags(out, preset, seed, split, extra, teacher_seed=teacher_seed)
            for lam in strengths:
                name = grs_run_name(lam, seed)
                lam_extra = extra + [f"--config.grs.strength={lam}"]
                runs[name] = run_flags(out, "baseline+grs", seed, split, lam_extra, name, teacher_seed)
        print_cost({name: run_plan(flags) for name, flags in runs.items()}, step_seconds(out))
        out.mkdir(parents=True, exist_ok=True)
        for name, flags in runs.items():
            add_wall_time(out / "wall_times.json", name, train(flags))
    from benchmarks.ablation_report import write_report, write_tuning_table

    if strengths:
        write_tuning_table(
            out,
            {f"baseline+grs, lambda={lam:g}": [out / grs_run_name(lam, s) for s in seeds] for lam in strengths},
            presets,
            seeds,
        )
    regime = regime or " ".join(["configs/fashion_mnist.py:PRESET", *extra])
    write_report(
        out, presets, seeds, docs, split=split, machine=f"{cpu_model()}, {os.cpu_count()} cores", regime=regime
    )


main = cli.command("benchmarks/ablation.py", __doc__, _define_flags, _run)


if __name__ == "__main__":
    sys.exit(main())
