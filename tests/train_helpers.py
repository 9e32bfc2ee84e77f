"""Shared helpers of the trainer tests: tiny configs and subprocess runs of train.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from configs import fashion_mnist

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
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
    from bvit_jax.param_groups import flatten_with_paths

    return {k: np.asarray(v) for k, v in flatten_with_paths(jax.device_get(tree))}
