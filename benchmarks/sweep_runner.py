"""Runs the trainings of a sweep as subprocesses, up to K at once, each after the run it needs.

Used by benchmarks/ablation.py. A :class:`Job` is one ``train.py`` invocation
with its workdir and the job it depends on (a student's ``fp`` teacher);
:func:`run_jobs` starts the jobs in their listed order as soon as a slot is
free and their dependency has finished, so the order of the list is the
start order among the ready jobs (list the longest chains first).

Each child writes its stdout and stderr to ``train.log`` in its workdir
(appended, one header line per start), so concurrent runs never interleave
on the terminal; the tool prints one line when a run starts and one when it
ends. Every ended child adds a record to ``runs.jsonl`` in the sweep folder
(name, start and end times, return code). A failed run's dependents are not
started; the others go on, and :func:`run_jobs` raises at the end.

Stopping: children run in their own sessions, so a Ctrl-C (or a SIGTERM to
the tool) reaches only the tool, which sends SIGTERM to every running child
(the trainer then saves a checkpoint and exits: the same command resumes),
waits up to :data:`STOP_GRACE_S`, kills what is left, records them in ``runs.jsonl``
and exits with an error that says to run the same command again.

With K > 1 on an accelerator, JAX's default of preallocating most of the
device memory in the first process would starve the others: each child gets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless the caller's environment
already sets one of the memory variables (:data:`MEMORY_VARIABLES`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bvit_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

STOP_GRACE_S = 120.0  # seconds a stopped child gets to checkpoint before it is killed
POLL_S = 0.2
MEMORY_VARIABLES = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


@dataclasses.dataclass
class Job:
    """One ``train.py`` run: ``name`` (unique in the sweep), its flags and workdir, the job it waits for."""

    name: str
    flags: list[str]
    workdir: Path
    needs: str | None = None
    wall_times: Path | None = None  # the JSON file its wall time is added to, under its workdir's name


class SweepFailed(UserError):
    """Some runs failed (or were not started because a run they need failed)."""


class SweepStopped(UserError):
    """The sweep was stopped (Ctrl-C / SIGTERM) after its running children were stopped."""


class _Stop(Exception):
    """Raised in the main thread by the SIGTERM handler while jobs run."""


def child_env(parallel: int, base: dict | None = None) -> dict:
    """The environment of every child: ``base`` (default ``os.environ``), unbuffered output, and with
    ``parallel > 1`` no memory preallocation unless ``base`` sets one of :data:`MEMORY_VARIABLES`."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if parallel > 1 and not any(v in env for v in MEMORY_VARIABLES):
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _start(job: Job, env: dict) -> tuple[subprocess.Popen, float, object]:
    """Start ``job``'s ``train.py`` with its output appended to ``workdir/train.log``."""
    job.workdir.mkdir(parents=True, exist_ok=True)
    log = open(job.workdir / "train.log", "a")  # noqa: SIM115 (closed when the child ends)
    t0 = time.time()
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} train.py {' '.join(job.flags)}\n")
    log.flush()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *job.flags],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C reaches the tool only; it stops the children (see `_stop_all`)
    )
    return proc, t0, log


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _record(records: Path, job: Job, t0: float, t1: float, returncode: int, stopped: bool = False) -> None:
    """Append one ended run to ``records`` (JSON lines) and its wall time to ``job.wall_times`` (when it
    ended by itself or stopped in time: the time it trained counts toward the run)."""
    with records.open("a") as f:
        row = {"run": job.name, "start": t0, "end": t1, "returncode": returncode, "stopped": stopped}
        f.write(json.dumps(row) + "\n")
    if (returncode == 0 or stopped and returncode >= 0) and job.wall_times is not None:
        add_wall_time(job.wall_times, job.workdir.name, t1 - t0)


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


def _stop_all(running: dict, jobs: dict[str, Job], records: Path) -> None:
    """SIGTERM every running child (the trainer checkpoints and exits), wait, then SIGKILL the rest;
    each stopped run is recorded (its status says whether it stopped in time: the trainer's own, or -9)."""
    for proc, _, _ in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_S
    for name, (proc, t0, log) in running.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            print(f"{name}: not stopped after {STOP_GRACE_S:.0f} s: killed", flush=True)
            proc.kill()
            proc.wait()
        log.close()
        _record(records, jobs[name], t0, time.time(), proc.returncode, stopped=True)
    print(f"stopped {len(running)} run(s); the same command resumes them", flush=True)


def _next_ready(pending: list[Job], finished: set[str], failed: dict[str, str]) -> Job | None:
    """The first pending job whose dependency has finished; jobs whose dependency failed move to ``failed``."""
    for job in list(pending):
        if job.needs in failed:
            pending.remove(job)
            failed[job.name] = f"not started: {job.needs} failed"
            print(f"{job.name}: {failed[job.name]}", flush=True)
            continue
        if job.needs is None or job.needs in finished:
            pending.remove(job)
            return job
    return None


def run_jobs(jobs: list[Job], parallel: int, records: Path) -> None:
    """Run ``jobs`` as subprocesses, at most ``parallel`` at once, each after the job it ``needs``.

    A dependency that is not in ``jobs`` must already be satisfied (it is
    treated as finished). Raises :class:`SweepFailed` after the others have
    run when a run failed; on Ctrl-C / SIGTERM stops the children and raises :class:`SweepStopped`.
    """
    names = {j.name for j in jobs}
    pending = [dataclasses.replace(j, needs=j.needs if j.needs in names else None) for j in jobs]
    env = child_env(parallel)
    records.parent.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple] = {}
    finished: set[str] = set()
    failed: dict[str, str] = {}
    by_name = {j.name: j for j in pending}

    def on_sigterm(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while pending or running:
            while len(running) < parallel and (job := _next_ready(pending, finished, failed)) is not None:
                running[job.name] = _start(job, env)
                print(f"start {job.name} ({len(running)} running; log {job.workdir / 'train.log'})", flush=True)
            if not running:
                break  # the rest wait for failed runs
            time.sleep(POLL_S)
            for name, (proc, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                t1 = time.time()
                log.close()
                del running[name]
                _record(records, by_name[name], t0, t1, proc.returncode)
                if proc.returncode == 0:
                    finished.add(name)
                    print(f"done  {name} in {(t1 - t0) / 60:.1f} min", flush=True)
                else:
                    failed[name] = f"exit status {proc.returncode}"
                    log_path = by_name[name].workdir / "train.log"
                    print(f"FAILED {name} ({failed[name]}); {log_path}:\n{_log_tail(log_path)}", flush=True)
    except (KeyboardInterrupt, _Stop):
        _stop_all(running, by_name, records)
        raise SweepStopped("stopped (Ctrl-C or SIGTERM); run the same command to resume") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise SweepFailed("; ".join(f"{n}: {why}" for n, why in failed.items()))
