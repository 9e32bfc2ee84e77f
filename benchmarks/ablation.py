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

``--parallel=K`` runs up to K trainings at once (benchmarks/sweep_runner.py:
a student starts once its teacher has ended; on a GPU the children share the
device without preallocating it); every run's output goes to ``train.log``
in its workdir, and ``runs.jsonl`` in ``--out`` records each run's start,
end and exit status. ``--sizes=default,w192_d6,w192_d12`` repeats the whole
sweep (teachers included) at width 192 and depth 6 / 12, each size in its
own folder ``out/SIZE`` with its own report in ``docs/SIZE``.
benchmarks/study_sweep.sh is the 10-seed, three-size study for one GPU.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sweep_runner import Job, run_jobs  # noqa: E402
from bvit_jax import cli  # noqa: E402
from bvit_jax.errors import UserError  # noqa: E402

PRESETS = ("fp", "baseline", "baseline+grs", "baseline+asm", "binaryvit")
DEFAULT_SIZE = "default"  # the config's own model (configs/fashion_mnist.py: width 96, depth 4)
_SIZE = re.compile(r"w(\d+)_d(\d+)")


def size_flags(size: str) -> list[str]:
    """The ``train.py`` flags of a model size: ``'default'`` none; ``'wW_dD'`` width W and depth D.

    A size only overrides ``model.overrides.embed_dim`` and ``.depth`` of the
    config (the heads, patch and MLP ratio stay the config's: 3 heads, patch 7,
    MLP 4x); every preset of the sweep, the ``fp`` teacher included, gets it.
    """
    if size == DEFAULT_SIZE:
        return []
    m = _SIZE.fullmatch(size)
    if not m:
        raise UserError(f"--sizes: {size!r} is neither {DEFAULT_SIZE!r} nor wWIDTH_dDEPTH (e.g. w192_d6)")
    width, depth = m.groups()
    return [f"--config.model.overrides.embed_dim={width}", f"--config.model.overrides.depth={depth}"]


def size_out(base: Path, size: str) -> Path:
    """The folder of one size below ``base`` (the runs' folder or the report's): ``base`` itself for the
    default size, else ``base/SIZE`` (so runs of different sizes never share a workdir, and each size gets
    its own report)."""
    return base if size == DEFAULT_SIZE else base / size


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


def print_cost(plans: dict[str, dict], parallel: int = 1, needs: dict[str, str | None] | None = None) -> None:
    """The sweep's expected cost before it starts: steps left per run, and time where a step time is known.

    Each plan holds ``steps``, ``done``, ``preset`` and ``sec`` (seconds per
    step, None when not measured yet). With ``parallel > 1`` it adds the
    expected wall time of the schedule (`schedule_seconds`), at the measured
    step times (which already include the slow-down of sharing the device
    when this sweep's earlier runs ran as many at once).
    """
    total, unknown = 0.0, []
    print(f"{'run':40s} {'steps left':>11s} {'expected':>10s}")
    for name, p in plans.items():
        left = p["steps"] - p["done"]
        t = p["sec"]
        if left and t is None:
            unknown.append(p["preset"])
        total += left * (t or 0.0)
        when = "-" if not left else ("?" if t is None else f"{left * t / 60:.1f} min")
        print(f"{name:40s} {left:>6d}/{p['steps']:<4d} {when:>10s}")
    note = f" + runs of {sorted(set(unknown))} (no step time measured yet)" if unknown else ""
    print(f"expected: {total / 60:.1f} min of training (compile and evaluation not included){note}", flush=True)
    if parallel > 1:
        seconds = {n: (p["steps"] - p["done"]) * (p["sec"] or 0.0) for n, p in plans.items()}
        wall = schedule_seconds(seconds, needs or {}, parallel)
        print(f"with {parallel} at once: {wall / 60:.1f} min of wall time at these step times{note}", flush=True)


def schedule_seconds(seconds: dict[str, float], needs: dict[str, str | None], parallel: int) -> float:
    """Wall time of running ``seconds`` (run -> its time) the way `run_jobs` does: whenever a slot is
    free (at most ``parallel`` at once), the first run in order whose dependency in ``needs`` has ended."""
    end: dict[str, float] = {}
    slots = [0.0] * parallel  # when each slot is next free
    pending = list(seconds)
    dep = {n: needs.get(n) if needs.get(n) in seconds else None for n in pending}
    while pending:
        t = min(slots)
        ready = [n for n in pending if dep[n] is None or end.get(dep[n], float("inf")) <= t]
        later = [end[dep[n]] for n in pending if dep[n] in end and end[dep[n]] > t]
        if not ready and later:
            slots[slots.index(t)] = min(later)  # this slot idles until a dependency ends
            continue
        name = ready[0] if ready else pending[0]
        end[name] = t + seconds[name]
        slots[slots.index(t)] = end[name]
        pending.remove(name)
    return max(end.values(), default=0.0)


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
    flags.DEFINE_list(
        "sizes",
        DEFAULT_SIZE,
        "Model sizes, each a full sweep of --presets x --seeds (its own fp teachers) in its own folder "
        f"(out/SIZE; {DEFAULT_SIZE!r}: out itself): {DEFAULT_SIZE!r} (the config's model) or wWIDTH_dDEPTH, "
        "e.g. w192_d6. Listed order is start order among ready runs: put the longest first.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "parallel",
        1,
        "Trainings at once (subprocesses; a student starts after its teacher). > 1: each child gets "
        "XLA_PYTHON_CLIENT_PREALLOCATE=false unless the environment sets a memory variable.",
        lower_bound=1,
        flag_values=fv,
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
        sizes=fv["sizes"].value,
        parallel=fv["parallel"].value,
    )
    return 0


def sweep_jobs(
    out: Path,
    seeds: list[int],
    presets: list[str],
    split: str,
    strengths: list[float],
    extra: list[str],
    teacher_seed: int | None = None,
    prefix: str = "",
) -> list[Job]:
    """The runs of one size's sweep into ``out``, in start order, each with the ``fp`` run it distils from.

    For each seed its ``fp`` run (also when ``fp`` is not in ``presets`` but
    the students need their own teacher), then its students; a shared teacher
    (``teacher_seed``) comes first. Job names are ``prefix`` + the run's name
    (unique across the sizes of one sweep).
    """
    jobs = []

    def add(preset: str, seed: int, flags: list[str], name: str | None = None) -> None:
        name = name or run_name(preset, seed)
        teacher = None if preset == "fp" else prefix + run_name("fp", seed if teacher_seed is None else teacher_seed)
        jobs.append(Job(prefix + name, flags, out / name, needs=teacher, wall_times=out / "wall_times.json"))

    if teacher_seed is not None and any(p != "fp" for p in presets):
        add("fp", teacher_seed, run_flags(out, "fp", teacher_seed, split, extra))
    for seed in seeds:
        own_teacher = teacher_seed is None  # then every seed needs its fp run, listed or not
        for preset in ["fp"] * ("fp" in presets or own_teacher) + [p for p in presets if p != "fp"]:
            add(preset, seed, run_flags(out, preset, seed, split, extra, teacher_seed=teacher_seed))
        for lam in strengths:
            name = grs_run_name(lam, seed)
            lam_extra = extra + [f"--config.grs.strength={lam}"]
            add("baseline+grs", seed, run_flags(out, "baseline+grs", seed, split, lam_extra, name, teacher_seed), name)
    return list({j.name: j for j in jobs}.values())  # a shared teacher listed once


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
    sizes: list[str] = (DEFAULT_SIZE,),
    parallel: int = 1,
) -> None:
    """Train the runs (unless ``report_only``), then write the report into ``docs``.

    Every size in ``sizes`` is a sweep of its own in `size_out` (its own
    teachers, wall times and report: ``docs`` for the default size,
    ``docs/SIZE`` for the others). Up to ``parallel`` trainings run at once
    (`benchmarks.sweep_runner.run_jobs`: a student after its teacher, logs in
    each workdir's ``train.log``, records in ``out/runs.jsonl``). Several
    invocations may share one ``out`` (e.g. one per CPU core, on disjoint
    presets or seeds): the wall times are merged, not overwritten.
    """
    size_extra = {size: extra + size_flags(size) for size in sizes}  # after the user's flags: the size holds
    if not report_only:
        jobs, plans = [], {}
        for size in sizes:
            size_dir, prefix = size_out(out, size), "" if size == DEFAULT_SIZE else f"{size}/"
            sized = sweep_jobs(size_dir, seeds, presets, split, strengths, size_extra[size], teacher_seed, prefix)
            sec = step_seconds(size_dir)
            for job in sized:
                plan = run_plan(job.flags)
                plans[job.name] = {**plan, "sec": sec.get(plan["preset"])}
            jobs += sized
        print_cost(plans, parallel, {j.name: j.needs for j in jobs})
        out.mkdir(parents=True, exist_ok=True)
        run_jobs(jobs, parallel, out / "runs.jsonl")
    from benchmarks.ablation_report import write_report, write_tuning_table

    for size in sizes:
        size_dir, size_docs = size_out(out, size), size_out(docs, size)
        if strengths:
            write_tuning_table(
                size_dir,
                {
                    f"baseline+grs, lambda={lam:g}": [size_dir / grs_run_name(lam, s) for s in seeds]
                    for lam in strengths
                },
                presets,
                seeds,
            )
        size_regime = regime or " ".join(["configs/fashion_mnist.py:PRESET", *extra])
        if size != DEFAULT_SIZE:
            size_regime += f" {size}"
        machine = f"{cpu_model()}, {os.cpu_count()} cores"
        write_report(size_dir, presets, seeds, size_docs, split=split, machine=machine, regime=size_regime)


main = cli.command("benchmarks/ablation.py", __doc__, _define_flags, _run)


if __name__ == "__main__":
    sys.exit(main())
