"""The trainer: sharding parity, resume, multi-process, NaN, corrupt checkpoints, KD, accuracy."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bvit_jax import sharding
from bvit_jax.checkpoint import CheckpointError, CheckpointMismatchError
from bvit_jax.losses import distillation_kl
from bvit_jax.metric_writers import read_metrics
from bvit_jax.models import create
from bvit_jax.train import ConfigError, train_and_evaluate
from bvit_jax.workdir import restore_params
from tests.train_helpers import ROOT, flat, free_port, run_env, run_train, tiny_config, train_cmd


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny fp teacher trained for a few steps (for the distillation paths)."""
    wd = tmp_path_factory.mktemp("teacher")
    train_and_evaluate(tiny_config("fp", total_steps=6), wd)
    return wd


# ----------------------------------------------------------------------------- losses
def test_kd_loss_is_zero_for_equal_logits_and_its_gradient_points_to_the_teacher():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    assert float(distillation_kl(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_kl(s, t)) > 0.01
    for temp in (1.0, 2.0):
        g = jax.grad(distillation_kl)(s, t, temp)
        expected = temp * (jax.nn.softmax(s / temp) - jax.nn.softmax(t / temp)) / s.shape[0]
        np.testing.assert_allclose(g, expected, atol=1e-6)
    # A small step against the gradient brings the student closer to the teacher.
    g = jax.grad(distillation_kl)(s, t)
    assert float(distillation_kl(s - 0.5 * g, t)) < float(distillation_kl(s, t))


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(model__preset="binaryvt"), "config.model.preset='binaryvt' is unknown"),
        (dict(model__variant="deit_huge"), "config.model.variant='deit_huge' is unknown"),
        (dict(global_batch_size=30, mesh__data=8), "not divisible by the 8 devices"),
        (dict(grs__strength=-1.0), "GRS strength must be >= 0"),
        (dict(model__dtype="float16"), "use 'float32' or 'bfloat16'"),
        (dict(log_every_steps=0), "config.log_every_steps=0 must be an integer >= 1"),
        (dict(checkpoint_every_steps=0), "config.checkpoint_every_steps=0 must be an integer >= 1"),
        (dict(eval_every_steps=-5), "config.eval_every_steps=-5 must be an integer >= 0"),
        (dict(optimizer__grad_accum_steps=3), "does not split into config.optimizer.grad_accum_steps=3 micro-batches"),
    ],
)
def test_config_errors_are_caught_before_compiling(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_and_evaluate(tiny_config("fp", **fields), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_missing_or_mismatched_teacher_is_a_clear_error(tmp_path, teacher):
    cfg = tiny_config("binaryvit", distill__teacher_workdir=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="holds no run of this trainer"):
        train_and_evaluate(cfg, tmp_path / "a")
    cfg = tiny_config("binaryvit", distill__teacher_workdir="")
    with pytest.raises(ConfigError, match="train the teacher first"):
        train_and_evaluate(cfg, tmp_path / "b")
    cfg = tiny_config("binaryvit", distill__teacher_workdir=str(teacher), data__image_size=21)  # 3x3 patches of 7 px
    with pytest.raises(ConfigError, match="data.image_size=28"):
        train_and_evaluate(cfg, tmp_path / "c")


def test_checkpoint_of_another_config_is_a_mismatch_not_damage(tmp_path):
    train_and_evaluate(tiny_config("fp", total_steps=4), tmp_path)
    config_json = (tmp_path / "config.json").read_text()
    cfg = tiny_config("fp", total_steps=8)
    cfg.model.overrides = dict(embed_dim=48, depth=1, num_heads=2)
    with pytest.raises(CheckpointMismatchError) as err:
        train_and_evaluate(cfg, tmp_path)
    msg = str(err.value)
    assert "is intact" in msg and "use a new --workdir" in msg
    assert "params/blocks/0/attn/q/linear/kernel: checkpoint (32, 32), config (48, 48)" in msg
    assert "model.overrides.embed_dim: 32 -> 48" in msg and "total_steps: 4 -> 8" in msg
    assert "damaged" not in msg and "Move the damaged" not in msg
    # Nothing was set aside or overwritten: the checkpoint and the run's config.json are as they were.
    assert not (tmp_path / "damaged_checkpoints").exists()
    assert (tmp_path / "config.json").read_text() == config_json
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]


# ----------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_equals_one_large_batch_update_for_update(tmp_path):
    """k=4 micro-batches of 8 vs one batch of 32: same updates, same lr at each, same params."""
    steps, runs = 8, {}
    for k in (1, 4):
        cfg = tiny_config(
            "fp", total_steps=steps, warmup_steps=2, optimizer__grad_accum_steps=k, diagnostics_every_steps=0
        )
        train_and_evaluate(cfg, tmp_path / str(k))
        runs[k] = (flat(restore_params(tmp_path / str(k), "latest")[1]), read_metrics(tmp_path / str(k), "train"))
    (p1, rows1), (p4, rows4) = runs[1], runs[4]
    assert [r["step"] for r in rows4] == list(range(1, steps + 1))  # one row per optimizer update
    lrs = [r["lr"] for r in rows1]
    assert [r["lr"] for r in rows4] == lrs  # identical: the schedule counts updates in both
    assert lrs[1] > 0 and max(lrs) == pytest.approx(2e-3 * 32 / 128)  # peak scaled by the batch of one update
    # Tolerance from the arithmetic: the batch mean is reassociated. Each of the ~4
    # chained reductions of the forward/backward (patch embedding, attention, MLP,
    # head) sums at most n = B*T = 32*50 terms, a relative change of <= n*u each
    # (u = 2^-24), so gradients differ by delta <= 4*n*u relative. AdamW's step is
    # lr * m/sqrt(v): perturbing m and v by delta moves it by <= 2*delta*lr, and each
    # update rounds p by <= u*|p| in both runs.
    u, n = 2.0**-24, 32 * 50
    delta = 4 * n * u
    for name in p1:
        bound = 2 * delta * sum(lrs) + 2 * steps * u * np.abs(p1[name])
        assert np.all(np.abs(p4[name] - p1[name]) <= bound), name
    for a, b in zip(rows1, rows4):
        assert abs(a["loss"] - b["loss"]) <= delta * a["loss"]


# ----------------------------------------------------------------------------- sharding
def test_one_step_on_8_devices_matches_1_device_data_parallel_and_fsdp(tmp_path, teacher):
    assert jax.device_count() == 8
    results = {}
    for name, (data, fsdp) in {"single": (1, 1), "dp": (8, 1), "fsdp": (2, 4)}.items():
        cfg = tiny_config(
            "binaryvit",
            total_steps=1,
            mesh__data=data,
            mesh__fsdp=fsdp,
            mesh__fsdp_min_size=64,
            distill__teacher_workdir=str(teacher),
            diagnostics_every_steps=0,
        )
        train_and_evaluate(cfg, tmp_path / name)
        results[name] = (
            flat(restore_params(tmp_path / name, "latest")[1]),
            read_metrics(tmp_path / name, "train")[-1]["loss"],
        )
    # FSDP really shards something in that configuration.
    mesh = sharding.create_mesh(2, 4)
    specs = jax.tree.leaves(sharding.tree_shardings(mesh, restore_params(tmp_path / "fsdp", "latest")[1], 64))
    assert any("fsdp" in str(s.spec) for s in specs)
    ref_params, ref_loss = results["single"]
    for name in ("dp", "fsdp"):
        params, loss = results[name]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")


# ----------------------------------------------------------------------------- resume
def _assert_same_run(full, resumed, steps: int) -> None:
    """The interrupted-and-resumed run equals the uninterrupted one: final params bitwise, every step's loss."""
    a = flat(restore_params(full, "latest")[1])
    b = flat(restore_params(resumed, "latest")[1])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    la = [(r["step"], r["loss"]) for r in read_metrics(full, "train")]
    lb = [(r["step"], r["loss"]) for r in read_metrics(resumed, "train")]
    assert la == lb and len(la) == steps


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
    _assert_same_run(tmp_path / "full", wd, steps)


# ----------------------------------------------------------------------------- multi-process
def _launch_two(workdir, arg: str, flags: list[str], logs: list[Path]) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            train_cmd(
                workdir,
                arg,
                *flags,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=run_env(1),
            cwd=ROOT,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for i, log in enumerate(logs)
    ]  # files, not pipes: a full pipe would block one process and deadlock its peer


def _wait_all(procs, logs, timeout=300) -> None:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-4000:]


def test_two_processes_on_loopback_match_one_process(tmp_path):
    # An eval and both checkpoint managers' saves at every step: with two
    # processes, 'latest' and 'best' saving the same step must not share a
    # barrier (each manager has its own barrier-key prefix).
    flags = [
        "--config.total_steps=4",
        "--config.global_batch_size=16",
        "--config.eval_batch_size=200",
        "--config.data.train_crop=resize",
        "--config.data.flip_prob=0.0",
        "--config.mesh.data=-1",
        "--config.diagnostics_every_steps=0",
        "--config.eval_every_steps=1",
        "--config.checkpoint_every_steps=1",
    ]
    run_train(tmp_path / "one", "fp,tiny", *flags, devices=2)
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    _wait_all(_launch_two(tmp_path / "two", "fp,tiny", flags, logs), logs)
    a = flat(restore_params(tmp_path / "one", "latest")[1])
    b = flat(restore_params(tmp_path / "two", "latest")[1])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    la = [r["loss"] for r in read_metrics(tmp_path / "one", "train")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "two", "train")]
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    ea, eb = read_metrics(tmp_path / "one", "eval")[-1], read_metrics(tmp_path / "two", "eval")[-1]
    assert ea["examples"] == eb["examples"] == 400
    assert ea["top1"] == pytest.approx(eb["top1"], abs=1e-6)


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
    _wait_all(_launch_two(tmp_path / "full", "fp,tiny", flags, logs), logs)

    wd = tmp_path / "interrupted"
    logs = [tmp_path / f"interrupted{i}.log" for i in range(2)]
    procs = _launch_two(wd, "fp,tiny", flags, logs)
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        m = wd / "metrics.jsonl"  # written by process 0
        if m.exists() and len(m.read_text().splitlines()) >= 20:
            procs[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _wait_all(procs, logs)
    saved = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 20 <= saved[0] < steps, f"expected one mid-run save, got {saved}"
    for log in logs:  # both processes stopped at that step for the notice
        assert f"saved a checkpoint at step {saved[0]}" in log.read_text()

    logs = [tmp_path / f"resumed{i}.log" for i in range(2)]
    _wait_all(_launch_two(wd, "fp,tiny", flags, logs), logs)
    _assert_same_run(tmp_path / "full", wd, steps)


# ----------------------------------------------------------------------------- failures
def test_nan_loss_stops_the_run_and_the_last_good_checkpoint_restores(tmp_path):
    cfg = tiny_config(
        "baseline+grs", total_steps=12, inject_nan_at_step=7, checkpoint_every_steps=4, distill__enabled=False
    )
    with pytest.raises(FloatingPointError, match="last good checkpoint is step 4"):
        train_and_evaluate(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4]
    _, params = restore_params(tmp_path, "latest")
    assert all(np.isfinite(v).all() for v in flat(params).values())
    # Rerunning without the fault resumes from step 4 and finishes.
    cfg.inject_nan_at_step = -1
    out = train_and_evaluate(cfg, tmp_path)
    assert out["examples"] == 400
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == list(range(1, 13))


def _corrupt(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 8)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    cfg = tiny_config("fp", total_steps=8, checkpoint_every_steps=4)
    train_and_evaluate(cfg, tmp_path)
    before = flat(restore_params(tmp_path, "latest")[1])
    _corrupt(tmp_path / "checkpoints" / "8")
    cfg.total_steps = 10
    with caplog.at_level("ERROR"):
        train_and_evaluate(cfg, tmp_path)
    assert "step 8" in caplog.text and "cannot be restored" in caplog.text
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == list(range(1, 11))  # resumed at 4, not from scratch
    assert flat(restore_params(tmp_path, "latest")[1]).keys() == before.keys()


def test_all_checkpoints_corrupt_refuses_to_start_from_scratch(tmp_path):
    cfg = tiny_config("fp", total_steps=8, checkpoint_every_steps=4)
    train_and_evaluate(cfg, tmp_path)
    for step in ("4", "8"):
        _corrupt(tmp_path / "checkpoints" / step)
    mtime = (tmp_path / "metrics.jsonl").stat().st_mtime
    cfg.total_steps = 12
    with pytest.raises(CheckpointError, match="Refusing to start from scratch"):
        train_and_evaluate(cfg, tmp_path)
    assert (tmp_path / "metrics.jsonl").stat().st_mtime == mtime


# ----------------------------------------------------------------------------- recipe
def test_grs_lowers_the_flip_rate_and_each_binary_preset_trains_differently(tmp_path):
    """Same seed and data, KD off: the presets differ only by their switches, and each switch shows."""
    runs = {}
    for name, preset, strength in [
        ("baseline", "baseline", 0.0),
        ("grs0", "baseline+grs", 0.0),
        ("grs", "baseline+grs", 1e-2),
        ("asm", "baseline+asm", 0.0),
        ("binaryvit", "binaryvit", 1e-2),
    ]:
        cfg = tiny_config(
            preset,
            total_steps=40,
            warmup_steps=2,
            distill__enabled=False,
            grs__strength=strength,
            diagnostics_every_steps=0,
            checkpoint_every_steps=40,
        )
        train_and_evaluate(cfg, tmp_path / name)
        runs[name] = (read_metrics(tmp_path / name, "train"), flat(restore_params(tmp_path / name, "latest")[1]))
    late_flips = {k: np.mean([r["flip_rate/all"] for r in rows[20:]]) for k, (rows, _) in runs.items()}
    # GRS at strength 0 is the baseline, bit for bit; switched on, it cuts late sign flips several-fold.
    assert [r["loss"] for r in runs["grs0"][0]] == [r["loss"] for r in runs["baseline"][0]]
    assert late_flips["baseline"] > 0
    assert late_flips["grs"] * 4 <= late_flips["baseline"], late_flips
    assert late_flips["binaryvit"] * 4 <= late_flips["asm"], late_flips
    # ASM adds parameters that learn, and changes the training trajectory.
    asm_keys = runs["asm"][1].keys() - runs["baseline"][1].keys()
    assert asm_keys and asm_keys <= runs["binaryvit"][1].keys()
    init = flat(
        nnx.to_pure_dict(
            nnx.state(
                create(
                    "vit_micro_28",
                    "baseline+asm",
                    num_classes=10,
                    image_size=28,
                    in_channels=1,
                    embed_dim=32,
                    depth=1,
                    num_heads=2,
                ),
                nnx.Param,
            )
        )
    )
    assert all(not np.array_equal(runs["asm"][1][k], init[k]) for k in asm_keys), asm_keys
    losses = {k: [r["loss"] for r in rows] for k, (rows, _) in runs.items() if k != "grs0"}
    names = sorted(losses)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert losses[a] != losses[b], (a, b)


def test_affine_branch_norm_trains_and_exports_bit_exact(tmp_path):
    """``model.overrides.branch_norm=affine``: the per-channel scale and bias of every block linear's branch
    learn (each moves off its init 1 / 0), the checkpoint holds them under ``norm/`` and no LayerNorm
    there, and the trained run's ``.bvit`` file gives the model's logits bit for bit on CPU."""
    from bvit_jax.export import export_workdir, load_packed
    from bvit_jax.packed import packed_forward
    from bvit_jax.workdir import restore

    cfg = tiny_config(
        "binaryvit",
        total_steps=8,
        warmup_steps=1,
        distill__enabled=False,
        diagnostics_every_steps=0,
        checkpoint_every_steps=8,
        model__overrides__branch_norm="affine",
    )
    train_and_evaluate(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run", "train")
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    params = flat(restore_params(tmp_path / "run", "latest")[1])
    branch = {k: v for k, v in params.items() if re.fullmatch(r"blocks/\d+/(attn|mlp)/\w+/norm/scale", k)}
    assert len(branch) == 6, sorted(params)  # depth 1: q, k, v, proj, fc1, fc2
    for k, v in branch.items():
        assert not np.array_equal(v, np.ones_like(v)), k
        assert not np.array_equal(params[k[: -len("scale")] + "bias"], np.zeros_like(v)), k
    _, model, _ = restore(str(tmp_path / "run"), which="latest", dtype=jnp.float32)
    assert model.opts.branch_norm == "affine"
    export_workdir(tmp_path / "run", tmp_path / "m.bvit", which="latest")
    packed = load_packed(tmp_path / "m.bvit")
    assert packed.opts.branch_norm == "affine"
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    graphdef, state = nnx.split(model)
    ref = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    got = np.asarray(packed_forward(packed, x))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------- accuracy
def test_fashion_mnist_short_run_is_well_above_chance(tmp_path):
    # ViTs learn slowly at first (no convolutional prior): ~500 steps of 64 images.
    cfg = tiny_config(
        "fp",
        total_steps=500,
        warmup_steps=25,
        global_batch_size=64,
        log_every_steps=100,
        checkpoint_every_steps=1000,
        data__eval_split="test[:2000]",
        eval_batch_size=400,
        optimizer__base_lr=3e-3,
        data__train_crop="resize",
        data__flip_prob=0.0,
    )
    cfg.model.overrides = dict(embed_dim=48, depth=2, num_heads=3)
    out = train_and_evaluate(cfg, tmp_path)
    assert out["examples"] == 2000
    assert out["top1"] >= 0.6, out
