"""bvit_jax.train.throughput: the MFU arithmetic, the step timer's exclusions, the profile written into a workdir."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from bvit_jax.runs import storage
from bvit_jax.train.throughput import Profile, StepTimer, peak_flops, train_flops_per_image


def test_peak_flops_takes_the_longest_known_prefix_and_knows_no_cpu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("TPU v5 lite") == 197e12  # not the shorter "TPU v5" (v5p)
    assert peak_flops("cpu") is None


def test_train_flops_count_forward_and_backward_of_the_student_and_the_teacher_forward():
    assert train_flops_per_image(10, 3) == 6 * 10 + 2 * 3


def test_the_step_timer_counts_steps_and_input_wait_and_leaves_out_excluded_work(monkeypatch):
    clock = iter([0.0, 1.0, 1.5, 2.0, 2.25, 10.0, 30.0, 34.0, 34.0])  # a fake perf_counter, one value a call
    monkeypatch.setattr("bvit_jax.train.throughput.time.perf_counter", lambda: next(clock))
    timer = StepTimer()  # t = 0
    batches = iter(range(2))
    timer.next_batch(batches)  # waits 1.0 -> 1.5
    timer.next_batch(batches)  # waits 2.0 -> 2.25
    with timer.excluded():  # 10 -> 30: an evaluation
        pass
    report = timer.report()  # t = 34: 34 s, 20 excluded, over 2 steps (then a new window at 34)
    assert report == {"step_time_s": 7.0, "data_wait_s": 0.375}


def test_the_profile_traces_the_configured_steps_into_the_workdir(tmp_path):
    config = ml_collections.ConfigDict({"profile_first_step": 1, "profile_steps": 2})
    profile = Profile(storage.as_path(tmp_path), config, start_step=0)
    step_fn = jax.jit(lambda x: x * 2)
    x = jnp.ones(4)
    for step in range(4):
        profile.before_step(step)
        x = step_fn(x)
        profile.after_step(step + 1, x)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    # Process != 0: nothing traced.
    Profile(storage.as_path(tmp_path / "other"), config, start_step=0, active=False).before_step(1)
    assert not (tmp_path / "other").exists()
