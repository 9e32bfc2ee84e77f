"""Sharding (:mod:`bvit_jax.sharding`): one training step on 8 fake CPU devices (``XLA_FLAGS`` set in
``tests/conftest.py``), data-parallel and FSDP, matches the step on one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bvit_jax import sharding
from bvit_jax.metric_writers import read_metrics
from bvit_jax.train import train_and_evaluate
from bvit_jax.workdir import restore_params
from tests.train_helpers import flat, tiny_config


@pytest.mark.parametrize("branch_norm", ["layernorm", "batchnorm"])
def test_one_step_on_8_devices_matches_1_device_data_parallel_and_fsdp(tmp_path, teacher, branch_norm):
    """With ``batchnorm`` the statistics of each channel are those of the global batch on every mesh (the
    sharded mean is synchronised by the computation), so the running averages match too."""
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
            model__overrides__branch_norm=branch_norm,
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
    assert any(k.endswith("norm/mean") for k in ref_params) == (branch_norm == "batchnorm")
    for name in ("dp", "fsdp"):
        params, loss = results[name]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")
