"""Sharding (:mod:`bvit_jax.train.sharding`): one training step on 8 fake CPU devices (``XLA_FLAGS`` set in
``tests/conftest.py``), data-parallel and FSDP, matches the step on one device."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from bvit_jax.runs.workdir import restore_params
from bvit_jax.train import sharding
from bvit_jax.train.metric_writers import read_metrics
from bvit_jax.train.trainer import train_and_evaluate
from tests.train_helpers import flat, tiny_config


def test_one_step_on_a_data_by_fsdp_mesh_of_8_devices_matches_1_device(tmp_path, teacher):
    """binaryvit with its teacher, ``branch_norm='batchnorm'`` and stochastic depth, on one device and on the
    8 devices as a (data 2, fsdp 4) mesh, which shards the batch and the parameters at once: the statistics
    of each channel are those of the global batch on every mesh (the sharded mean is synchronised by the
    computation), so the running averages match too; each example's drop keys (depth 2,
    ``drop_path_rate=0.5``) are a function of (seed, step, row) and the threefry PRNG is partitionable, so
    every mesh drops the same examples. (The default LayerNorm branch over meshes that span processes,
    data-parallel alone and FSDP: ``tests/test_multihost.py``.)"""
    assert jax.config.jax_threefry_partitionable  # random bits independent of the sharding
    branch_norm = "batchnorm"
    drop = {"model__drop_path_rate": 0.5, "model__overrides__depth": 2}
    assert jax.device_count() == 8
    results = {}
    for name, (data, fsdp) in {"single": (1, 1), "fsdp": (2, 4)}.items():
        cfg = tiny_config(
            "binaryvit",
            total_steps=1,
            mesh__data=data,
            mesh__fsdp=fsdp,
            mesh__fsdp_min_size=64,
            distill__teacher_workdir=str(teacher),
            diagnostics_every_steps=0,
            model__overrides__branch_norm=branch_norm,
            **drop,
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
    assert any(k.endswith("norm/mean") for k in ref_params)
    params, loss = results["fsdp"]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- multislice meshes
@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What ``jax.experimental.mesh_utils`` reads of a device: id, slice, process, platform, kind, TPU coordinates."""

    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"
    coords: tuple[int, int, int] = (0, 0, 0)
    core_on_chip: int = 0


def fake_slices(num_slices: int, per_slice: int, platform: str = "cpu") -> list[FakeDevice]:
    """``num_slices`` slices of ``per_slice`` devices; TPU ones as v4 chips on a ``2 x (per_slice / 2)`` grid."""
    devices = []
    for s in range(num_slices):
        for i in range(per_slice):
            tpu = platform == "tpu"
            devices.append(
                FakeDevice(
                    id=s * per_slice + i,
                    slice_index=s,
                    process_index=(s * per_slice + i) // 4,  # 4 chips per host, as a TPU VM
                    platform=platform,
                    device_kind="TPU v4" if tpu else "cpu",
                    coords=(i % 2, i // 2, 0) if tpu else (0, 0, 0),
                )
            )
    return devices


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize(("num_slices", "per_slice", "fsdp"), [(2, 4, 2), (2, 4, 4), (4, 8, 4), (4, 8, 1), (2, 8, 8)])
def test_multislice_mesh_keeps_fsdp_groups_in_one_slice(platform, num_slices, per_slice, fsdp):
    """Every fsdp group (a mesh row) lies in one slice; every data group (a column) spans all slices equally."""
    devices = fake_slices(num_slices, per_slice, platform)
    mesh = sharding.create_mesh(-1, fsdp, devices)
    data = num_slices * per_slice // fsdp
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
    grid = mesh.devices
    assert sorted(d.id for d in grid.flat) == [d.id for d in devices]  # each device exactly once
    for row in grid:  # fsdp group
        assert len({d.slice_index for d in row}) == 1
    for col in grid.T:  # data group: data / S devices of each slice
        counts = [sum(d.slice_index == s for d in col) for s in range(num_slices)]
        assert counts == [data // num_slices] * num_slices


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize(("data", "fsdp"), [(-1, 1), (4, 2), (2, 4), (1, 8)])
def test_single_slice_mesh_is_jax_make_mesh(platform, data, fsdp):
    """One slice (fake devices, and the 8 CPU devices, which have no slice_index): today's ``jax.make_mesh``."""
    auto = (jax.sharding.AxisType.Auto,) * 2
    for devices in (fake_slices(1, 8, platform), jax.devices()):
        mesh = sharding.create_mesh(data, fsdp, devices)
        ref = jax.make_mesh((8 // fsdp, fsdp), ("data", "fsdp"), axis_types=auto, devices=devices)
        assert mesh.axis_names == ref.axis_names and mesh.axis_types == ref.axis_types
        assert [d.id for d in mesh.devices.flat] == [d.id for d in ref.devices.flat]
        assert mesh.devices.shape == ref.devices.shape


def test_multislice_mesh_errors_name_the_fix():
    devices = fake_slices(2, 4)
    with pytest.raises(ValueError, match=r"fsdp=8 does not fit within one slice of 4 devices"):
        sharding.create_mesh(-1, 8, devices)
    with pytest.raises(ValueError, match=r"fsdp=3 does not divide the 8 devices"):
        sharding.create_mesh(-1, 3, devices)
    with pytest.raises(ValueError, match=r"a multislice mesh covers every device"):
        sharding.create_mesh(2, 2, devices)  # a sub-mesh is a single-host convenience only
    with pytest.raises(ValueError, match=r"different numbers of devices"):
        sharding.create_mesh(-1, 2, devices[:6])
