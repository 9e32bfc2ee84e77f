"""Shared helpers of the trainer tests: tiny configs, subprocess runs of train.py (one process or two), the
``teacher`` fixture (registered in ``tests/conftest.py``), a batch of images for ``vit_nano``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bvit_jax.data import create_eval_iterator
from configs import fashion_mnist
from tests.xla_flags import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(preset: str = "fp", **fields):
    """``configs/fashion_mnist.py:PRESET,tiny`` on one device, with dotted-field overrides."""
    c = fashion_mnist.get_config(f"{preset},tiny")
    c.mesh.data, c.mesh.fsdp = 1, 1
    for key, value in fields.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def train_cmd(workdir, arg: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={ROOT / 'configs' / 'fashion_mnist.py'}:{arg}",
        f"--workdir={workdir}",
        *flags,
    ]


def run_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_train(workdir, arg: str, *flags: str, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_cmd(workdir, arg, *flags), env=run_env(devices), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flat(tree) -> dict[str, np.ndarray]:
    from bvit_jax.nn.param_groups import flatten_with_paths

    return {k: np.asarray(v) for k, v in flatten_with_paths(jax.device_get(tree))}


NANO_BATCH = 4  # images in a nano_batch


def nano_batch(seed=0):
    """``NANO_BATCH`` random 16x16 RGB images (the input of ``vit_nano``) and labels ``0, 1, ... mod 10``."""
    x = jax.random.normal(jax.random.key(seed), (NANO_BATCH, 16, 16, 3))
    y = jnp.arange(NANO_BATCH) % 10
    return x, y


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """A tiny fp teacher trained for a few steps (for the distillation paths), once per test session; read-only."""
    from bvit_jax.train.trainer import train_and_evaluate

    wd = tmp_path_factory.mktemp("teacher")
    train_and_evaluate(tiny_config("fp", total_steps=6), wd)
    return wd


def eval_top1(model, config) -> float:
    """Top-1 of ``model`` over the config's eval split, as the trainer counts it (masked padding)."""
    forward = jax.jit(lambda x: model(x))
    correct = count = 0.0
    for batch in create_eval_iterator(config.data, local_batch_size=config.eval_batch_size):
        hit = np.argmax(np.asarray(forward(jnp.asarray(batch["image"]))), -1) == np.asarray(batch["label"])
        mask = np.asarray(batch["mask"], bool)
        correct, count = correct + float(np.sum(hit & mask)), count + float(np.sum(mask))
    return correct / count


def assert_same_run(full, resumed, steps: int) -> None:
    """The interrupted-and-resumed run equals the uninterrupted one: final params bitwise, every step's loss."""
    from bvit_jax.runs.workdir import restore_params
    from bvit_jax.train.metric_writers import read_metrics

    a = flat(restore_params(full, "latest")[1])
    b = flat(restore_params(resumed, "latest")[1])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    la = [(r["step"], r["loss"]) for r in read_metrics(full, "train")]
    lb = [(r["step"], r["loss"]) for r in read_metrics(resumed, "train")]
    assert la == lb and len(la) == steps


def launch_two(
    workdir, arg: str, flags: list[str], logs: list[Path], cwds: list[Path] | None = None
) -> list[subprocess.Popen]:
    """train.py on two processes over a loopback coordinator (1 CPU device each); ``cwds``: each one's directory."""
    port = free_port()
    cwds = cwds or [ROOT, ROOT]
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
            cwd=cwd,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for i, (log, cwd) in enumerate(zip(logs, cwds))
    ]  # files, not pipes: a full pipe would block one process and deadlock its peer


def wait_all(procs, logs, timeout=300) -> None:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-4000:]
