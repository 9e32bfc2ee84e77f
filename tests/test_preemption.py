"""Preemption (:mod:`bvit_jax.train.preemption`) of runs whose folder is in a bucket, as on a pod: a SIGTERM
stops the run at a saved step, with one process or reaching only one of two, and the run resumed from the
bucket equals the uninterrupted one bitwise.

The buckets are served by a real Cloud Storage emulator on loopback (tests/gcs_emulator.py): checkpoints go
through orbax and TensorStore, config.json, metrics and the input positions through gcsfs, the teacher is
read from the bucket. Resuming from local disk is covered by tests/test_multihost.py."""

from __future__ import annotations

import signal
import subprocess
import time

from bvit_jax.runs import storage
from tests.train_helpers import ROOT, assert_same_run, launch_two, run_env, run_train, train_cmd, wait_all


def logged_steps(workdir) -> int:
    """Lines of ``workdir/metrics.jsonl`` so far (0 before the first)."""
    try:
        return len(storage.as_path(workdir).joinpath("metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def saved_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (storage.as_path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def sigterm_after(procs, target, workdir, lines: int = 20) -> None:
    """Send SIGTERM to ``target`` once ``workdir`` has logged ``lines`` steps (the others keep running)."""
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if logged_steps(workdir) >= lines:
            target.send_signal(signal.SIGTERM)
            return
        time.sleep(0.05)


def test_sigterm_then_resume_from_the_bucket_equals_uninterrupted_run_bitwise(tmp_path, teacher, gcs):
    steps = 100
    flags = [
        f"--config.total_steps={steps}",
        "--config.checkpoint_every_steps=100000",
        f"--config.distill.teacher_workdir={gcs.upload(teacher, 'teacher')}",
        "--config.diagnostics_every_steps=0",
    ]
    full = gcs.url("one_process_full")
    run_train(full, "binaryvit,tiny", *flags)

    wd = gcs.url("one_process_interrupted")
    log = tmp_path / "interrupted.log"
    proc = subprocess.Popen(
        train_cmd(wd, "binaryvit,tiny", *flags), env=run_env(), cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    sigterm_after([proc], proc, wd)
    proc.wait(timeout=240)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    stopped = saved_steps(wd)[-1]
    assert 20 <= stopped < steps, f"SIGTERM should stop mid-run, stopped at {stopped}"
    assert "SIGTERM" in err

    run_train(wd, "binaryvit,tiny", *flags)  # resumes from the bucket
    assert_same_run(full, wd, steps)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resume_is_bitwise(tmp_path, gcs):
    """A preemption notice reaching only process 1: both processes save the same step into the bucket and
    exit 0; resuming with two processes ends bitwise equal to an uninterrupted run."""
    steps = 80
    flags = [
        f"--config.total_steps={steps}",
        "--config.global_batch_size=16",
        "--config.mesh.data=-1",
        "--config.checkpoint_every_steps=100000",
        "--config.diagnostics_every_steps=0",
    ]
    full = gcs.url("two_processes_full")
    logs = [tmp_path / f"full{i}.log" for i in range(2)]
    wait_all(launch_two(full, "fp,tiny", flags, logs), logs)

    wd = gcs.url("two_processes_interrupted")
    logs = [tmp_path / f"interrupted{i}.log" for i in range(2)]
    procs = launch_two(wd, "fp,tiny", flags, logs)
    sigterm_after(procs, procs[1], wd)  # metrics.jsonl is written by process 0
    wait_all(procs, logs)
    saved = saved_steps(wd)
    assert len(saved) == 1 and 20 <= saved[0] < steps, f"expected one mid-run save, got {saved}"
    for log in logs:  # both processes stopped at that step for the notice
        assert f"saved a checkpoint at step {saved[0]}" in log.read_text()

    logs = [tmp_path / f"resumed{i}.log" for i in range(2)]
    wait_all(launch_two(wd, "fp,tiny", flags, logs), logs)
    assert_same_run(full, wd, steps)
