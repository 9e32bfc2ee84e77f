"""Preemption (:mod:`bvit_jax.train.preemption`): a SIGTERM stops the run at a saved step, with one process or
reaching only one of two, and the resumed run equals the uninterrupted one bitwise."""

from __future__ import annotations

import signal
import subprocess
import time

from tests.train_helpers import ROOT, assert_same_run, launch_two, run_env, run_train, train_cmd, wait_all


def test_sigterm_then_resume_equals_uninterrupted_run_bitwise(tmp_path, teacher):
    steps = 300
    flags = [
        f"--config.total_steps={steps}",
        "--config.checkpoint_every_steps=100000",
        f"--config.distill.teacher_workdir={teacher}",
        "--config.diagnostics_every_steps=0",
    ]
    run_train(tmp_path / "full", "binaryvit,tiny", *flags)

    wd = tmp_path / "interrupted"
    log = tmp_path / "interrupted.log"
    proc = subprocess.Popen(
        train_cmd(wd, "binaryvit,tiny", *flags), env=run_env(), cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        m = wd / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 20:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    proc.wait(timeout=240)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    stopped = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert 20 <= stopped < steps, f"SIGTERM should stop mid-run, stopped at {stopped}"
    assert "SIGTERM" in err

    run_train(wd, "binaryvit,tiny", *flags)  # resumes
    assert_same_run(tmp_path / "full", wd, steps)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resume_is_bitwise(tmp_path):
    """A preemption notice reaching only process 1: both processes save the same step and
    exit 0; resuming with two processes ends bitwise equal to an uninterrupted run."""
    steps = 150
    flags = [
        f"--config.total_steps={steps}",
        "--config.global_batch_size=16",
        "--config.mesh.data=-1",
        "--config.checkpoint_every_steps=100000",
        "--config.diagnostics_every_steps=0",
    ]
    logs = [tmp_path / f"full{i}.log" for i in range(2)]
    wait_all(launch_two(tmp_path / "full", "fp,tiny", flags, logs), logs)

    wd = tmp_path / "interrupted"
    logs = [tmp_path / f"interrupted{i}.log" for i in range(2)]
    procs = launch_two(wd, "fp,tiny", flags, logs)
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        m = wd / "metrics.jsonl"  # written by process 0
        if m.exists() and len(m.read_text().splitlines()) >= 20:
            procs[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    wait_all(procs, logs)
    saved = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 20 <= saved[0] < steps, f"expected one mid-run save, got {saved}"
    for log in logs:  # both processes stopped at that step for the notice
        assert f"saved a checkpoint at step {saved[0]}" in log.read_text()

    logs = [tmp_path / f"resumed{i}.log" for i in range(2)]
    wait_all(launch_two(wd, "fp,tiny", flags, logs), logs)
    assert_same_run(tmp_path / "full", wd, steps)
