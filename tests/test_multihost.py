"""Several processes on loopback, as on a pod: a binary preset distilling from its teacher, data-parallel
and FSDP over the processes, equals the one-process run; a workdir the processes do not share stops the run
at start-up."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bvit_jax.runs.workdir import restore_params
from bvit_jax.train.metric_writers import read_metrics
from tests.tolerances import gamma_n
from tests.train_helpers import ROOT, assert_same_run, flat, launch_two, run_env, run_train, train_cmd, wait_all

FLAGS = [
    "--config.total_steps=4",
    "--config.global_batch_size=16",
    "--config.eval_batch_size=200",
    "--config.mesh.data=-1",
    "--config.diagnostics_every_steps=0",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1",
    # The same examples in each global batch on 1 and 2 processes (in another order), no augmentation draws
    # (those are seeded per process).
    "--config.data.train_crop=resize",
    "--config.data.flip_prob=0.0",
]


def test_binary_preset_with_teacher_on_two_processes_matches_one_process(tmp_path, teacher):
    """binaryvit distilling from its teacher: 2 processes data-parallel and FSDP = 1 process, 2 devices.

    An eval and both checkpoint managers' saves at steps 2 and 4: with two processes 'latest' and 'best'
    saving the same step must not share a barrier (each manager has its own barrier-key prefix)."""
    # Under FSDP every array of the tiny model is sharded (min size 1): the student's state and the
    # teacher, restored straight into the mesh that spans both processes.
    flags = [*FLAGS, f"--config.distill.teacher_workdir={teacher}", "--config.mesh.fsdp_min_size=1"]
    run_train(tmp_path / "one", "binaryvit,tiny", *flags, devices=2)
    ref_loss = [r["loss"] for r in read_metrics(tmp_path / "one", "train")]
    ref_params = flat(restore_params(tmp_path / "one", "latest")[1])
    ref_eval = read_metrics(tmp_path / "one", "eval")
    assert len(ref_loss) == 4 and all("kd_loss" in r for r in read_metrics(tmp_path / "one", "train"))

    # The runs see the same 16 examples per step, but the global batch of two processes holds them in
    # another order (process 0's rows, then process 1's), so every mean over the batch sums in another
    # order: per step the two differ by at most 2 gamma_15 relative (tests/tolerances.py); Adam's
    # normalised updates carry that through 4 steps with a gain of order 1, so 4 * 2 * gamma_15 ~ 7.2e-6
    # bounds the losses, and the parameters (|w| <= ~1, lr ~1e-3 per step) move by less than 1e-6 apart.
    bound = 4 * 2 * gamma_n(15)
    for fsdp in (1, 2):
        wd = tmp_path / f"two_fsdp{fsdp}"
        logs = [tmp_path / f"fsdp{fsdp}_process{i}.log" for i in range(2)]
        wait_all(launch_two(wd, "binaryvit,tiny", [*flags, f"--config.mesh.fsdp={fsdp}"], logs), logs)
        loss = [r["loss"] for r in read_metrics(wd, "train")]
        np.testing.assert_allclose(loss, ref_loss, rtol=bound, atol=0, err_msg=f"fsdp={fsdp}")
        params = flat(restore_params(wd, "latest")[1])
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=bound, atol=1e-6, err_msg=f"fsdp={fsdp} {k}")
        evals = read_metrics(wd, "eval")
        assert [e["examples"] for e in evals] == [e["examples"] for e in ref_eval] == [400, 400]
        for e, r in zip(evals, ref_eval):
            assert e["top1"] == pytest.approx(r["top1"], abs=1 / 400)  # at most one example on a boundary


def test_a_workdir_the_processes_do_not_share_is_refused_at_start_up(tmp_path):
    # A relative --workdir resolved against two working directories: two local folders, as on two
    # hosts with their own disks. Both processes stop before any checkpoint is written.
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    for c in cwds:
        c.mkdir()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = launch_two("run", "fp,tiny", FLAGS, logs, cwds=cwds)
    for p in procs:
        p.wait(timeout=300)
    for p, log in zip(procs, logs):
        text = log.read_text()
        assert p.returncode == 1, text[-3000:]
        assert "is not one folder that all 2 processes see" in text and "process(es) [1]" in text
    for c in cwds:
        assert not (c / "run" / "checkpoints").exists()


def test_a_run_saved_on_two_processes_resumes_on_two_bitwise_and_on_one_from_the_step(tmp_path):
    """A resized pod: the saved input positions are of 2 processes. On 2 the resume is exact; on 1 it is
    refused with what happened and the fix, and with data_resume=from_step it continues."""
    steps = 8
    flags = [
        *FLAGS,
        f"--config.total_steps={steps}",
        "--config.checkpoint_every_steps=4",
        "--config.keep_checkpoints=5",
    ]
    logs = [tmp_path / f"full{i}.log" for i in range(2)]
    wait_all(launch_two(tmp_path / "full", "fp,tiny", flags, logs), logs)

    def stopped_after_step_4(name: str) -> Path:
        """The run folder as a run stopped after its step-4 checkpoint leaves it."""
        wd = tmp_path / name
        shutil.copytree(tmp_path / "full", wd)
        for sub in ("checkpoints", "best"):
            shutil.rmtree(wd / sub / str(steps), ignore_errors=True)
        return wd

    wd = stopped_after_step_4("on_two")
    logs = [tmp_path / f"two{i}.log" for i in range(2)]
    wait_all(launch_two(wd, "fp,tiny", flags, logs), logs)
    assert_same_run(tmp_path / "full", wd, steps)

    wd = stopped_after_step_4("on_one")
    before = (wd / "config.json").read_text()
    proc = subprocess.run(train_cmd(wd, "fp,tiny", *flags), env=run_env(1), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "input positions of 2 process(es) and this run has 1" in proc.stderr
    assert "--config.data_resume=from_step" in proc.stderr and "damaged" not in proc.stderr
    assert (wd / "config.json").read_text() == before and not (wd / "damaged_checkpoints").exists()

    run_train(wd, "fp,tiny", *flags, "--config.data_resume=from_step")
    rows, ref = read_metrics(wd, "train"), read_metrics(tmp_path / "full", "train")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows[:4]] == [r["loss"] for r in ref[:4]]  # the two-process steps, kept
    # Steps 5-8 read the one-process order from step 4 on: the same examples per batch as two processes
    # read (in another order: the global batch is process 0's rows then process 1's), so the losses agree
    # to the reordering bound of a 16-term mean, 2 gamma_15 per step, over 4 steps.
    np.testing.assert_allclose(
        [r["loss"] for r in rows[4:]], [r["loss"] for r in ref[4:]], rtol=4 * 2 * gamma_n(15), atol=0
    )
