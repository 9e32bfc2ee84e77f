"""DeiT weight import from timm: logit parity with PyTorch, binary students, errors, the command line.

Needs ``requirements-interop.txt`` (torch, torchvision, timm), which
``scripts/setup.sh`` installs.
Timm models are randomly initialised (no downloads) and every parameter is
perturbed, so a mis-mapped bias or LayerNorm shows in the logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import timm  # noqa: E402
import torch  # noqa: E402
from flax import nnx

from bvit_jax.interop.timm import (
    SHARED_PATH,
    UnsupportedCheckpointError,
    from_timm,
    load_state_dict_file,
    load_timm_state_dict,
    parse_timm_name,
)
from bvit_jax.nn.models import create
from bvit_jax.nn.param_groups import flatten_with_paths
from bvit_jax.runs.workdir import restore_params
from tests.train_helpers import ROOT
from tests.xla_flags import xla_flags

torch.set_num_threads(1)


def _timm_model(name: str, depth: int, seed: int = 0, **kw):
    """A timm model with random weights, every parameter perturbed (biases and LN too)."""
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, depth=depth, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _images(n: int, size: int, channels: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))  # NCHW for torch, NHWC for us


def _flat(model) -> dict[str, np.ndarray]:
    return {p: np.asarray(v) for p, v in flatten_with_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


# ----------------------------------------------------------------------------- parity
# deit_small takes the same path with other widths (the variant table); deit_tiny is the cheap one.
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224"])
def test_imported_deit_gives_the_logits_of_timm(name):
    tm = _timm_model(name, depth=2)
    x_torch, x_jax = _images(2, 224)
    with torch.no_grad():
        want = tm(x_torch).numpy()
    model, report = from_timm(name, tm.state_dict())  # depth read from the state dict
    assert model.cfg.depth == 2 and model.cfg.num_classes == 1000
    got = np.asarray(model(x_jax))
    err = float(np.abs(got - want).max())
    print(f"{name} (depth 2): max |logit diff| = {err:.2e} (logits up to {np.abs(want).max():.2f})")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert not report.left_at_init  # the fp model is exactly DeiT
    assert report.num_copied == sum(p.numel() for p in tm.parameters())
    d = model.cfg.embed_dim
    assert report.copied["blocks/1/attn/k/linear/kernel"] == f"blocks.1.attn.qkv.weight[{d}:{2 * d}].T"


def test_parity_with_other_classes_channels_and_resolution():
    tm = _timm_model("deit_tiny_patch16_224", depth=1, seed=3, num_classes=7, in_chans=1, img_size=64)
    x_torch, x_jax = _images(3, 64, channels=1)
    with torch.no_grad():
        want = tm(x_torch).numpy()
    model, _ = from_timm("deit_tiny_patch16_224", tm.state_dict())
    assert (model.cfg.image_size, model.cfg.in_channels, model.cfg.num_classes) == (64, 1, 7)
    np.testing.assert_allclose(np.asarray(model(x_jax)), want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- binary student
def test_binary_student_gets_the_shared_tensors_and_keeps_binary_only_params_at_init():
    tm = _timm_model("deit_tiny_patch16_224", depth=2, seed=5)
    teacher, _ = from_timm("deit_tiny_patch16_224", tm.state_dict())
    student, report = from_timm("deit_tiny_patch16_224", tm.state_dict(), preset="binaryvit", seed=11)
    fresh = create("deit_tiny", "binaryvit", seed=11, depth=2)
    t, s, f = _flat(teacher), _flat(student), _flat(fresh)

    shared = {p for p in s if SHARED_PATH.match(p)}
    assert shared == set(t) == set(report.copied)
    for p in shared:
        np.testing.assert_array_equal(s[p], t[p], err_msg=p)
    assert set(report.left_at_init) == set(s) - shared
    for p in report.left_at_init:
        np.testing.assert_array_equal(s[p], f[p], err_msg=p)
    kinds = report.left_by_kind()
    assert set(kinds) == {
        "activation shift beta (RSign)",
        "ASM gamma",
        "shortcut LayerNorm",
        "RPReLU",
        "attention level c",
    }
    assert kinds["attention level c"] == (2, 2)
    assert kinds["shortcut LayerNorm"][0] == 2 * 6 * 2  # 6 linears per block, scale + bias
    # The student runs (its forward is binary, so its logits differ from the teacher's).
    assert np.isfinite(np.asarray(student(_images(1, 224)[1]))).all()
    assert "left at init 68 tensors" in str(report)


def test_the_report_names_the_kind_of_every_parameter_of_le_and_lis_switches():
    """A model with ``rprelu_everywhere`` and ``attention_bypass`` imports like the baseline: the RPReLU of
    every block linear and of the attention output, and the bypass's LayerNorm, are left at init and
    reported by kind (not by raw path); everything timm has is copied."""
    tm = _timm_model("deit_tiny_patch16_224", depth=1, seed=4)
    model = create("deit_tiny", "baseline", depth=1, rprelu_everywhere=True, attention_bypass=True)
    report = load_timm_state_dict(model, tm.state_dict())
    kinds = report.left_by_kind()
    assert set(kinds) == {
        "activation shift beta (RSign)",
        "shortcut LayerNorm",
        "RPReLU",
        "attention level c",
        "attention bypass LayerNorm",
    }
    # 7 RPReLUs of 3 vectors each: q, k, v, proj, fc2 and the attention output 192 wide, fc1 4 x 192
    assert kinds["RPReLU"] == (3 * 7, 3 * (6 * 192 + 4 * 192))
    assert kinds["attention bypass LayerNorm"] == (2, 2 * 192)


def test_load_into_an_existing_model_and_skip_head():
    tm = _timm_model("deit_tiny_patch16_224", depth=1, seed=2)
    model = create("deit_tiny", "baseline", depth=1, num_classes=10)
    head_before = np.asarray(model.head.kernel[...])
    report = load_timm_state_dict(model, tm.state_dict(), skip_head=True)
    assert report.left_by_kind()["head (skip_head)"] == (2, 192 * 10 + 10)
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), head_before)
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), tm.pos_embed.detach().numpy())
    with pytest.raises(ValueError, match="num_classes"):
        load_timm_state_dict(create("deit_tiny", "fp", depth=1, num_classes=10), tm.state_dict())


# ----------------------------------------------------------------------------- errors
def test_distilled_deit_is_refused_naming_the_distillation_keys():
    sd = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1).state_dict()
    with pytest.raises(UnsupportedCheckpointError, match=r"dist_token.*head_dist"):
        load_timm_state_dict(create("deit_tiny", "fp", depth=1), sd)
    with pytest.raises(UnsupportedCheckpointError, match=r"dist_token.*head_dist"):
        from_timm("deit_tiny_distilled_patch16_224", sd)
    with pytest.raises(UnsupportedCheckpointError, match="dist_token"):
        parse_timm_name("deit_small_distilled_patch16_224.fb_in1k")


def test_mismatches_name_the_setting_to_change():
    sd = _timm_model("deit_tiny_patch16_224", depth=2).state_dict()
    with pytest.raises(ValueError, match="depth=2"):
        load_timm_state_dict(create("deit_tiny", "fp", depth=1), sd)
    with pytest.raises(ValueError, match="shallower"):
        load_timm_state_dict(create("deit_tiny", "fp", depth=3), sd)
    with pytest.raises(ValueError, match="image_size"):
        load_timm_state_dict(create("deit_tiny", "fp", depth=2, image_size=32), sd)
    with pytest.raises(ValueError, match="wide"):
        from_timm("deit_small_patch16_224", sd)
    with pytest.raises(ValueError, match="unsupported timm model"):
        parse_timm_name("resnet50")
    bad = dict(sd, **{"blocks.0.ls1.gamma": torch.ones(192)})
    with pytest.raises(UnsupportedCheckpointError, match="layer scale"):
        load_timm_state_dict(create("deit_tiny", "fp", depth=2), bad)


def test_deit_checkpoint_file_formats(tmp_path):
    tm = _timm_model("deit_tiny_patch16_224", depth=1, seed=4)
    sd = tm.state_dict()
    torch.save(
        {"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "deit.pth"
    )  # DeiT's own layout, DDP prefix
    np.savez(tmp_path / "deit.npz", **{k: v.numpy() for k, v in sd.items()})
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors")
    )  # the HF hub's timm format
    x = _images(1, 224)[1]
    ref = np.asarray(from_timm("deit_tiny_patch16_224", sd)[0](x))
    for f in ("deit.pth", "deit.npz", "model.safetensors"):
        loaded = load_state_dict_file(tmp_path / f)
        assert set(loaded) == set(sd)
        np.testing.assert_array_equal(np.asarray(from_timm("deit_tiny", tmp_path / f)[0](x)), ref)


# ----------------------------------------------------------------------------- command line -> trainer
def test_command_line_writes_a_teacher_workdir_the_trainer_accepts(tmp_path):
    tm = _timm_model("deit_tiny_patch16_224", depth=1, seed=6)
    torch.save(tm.state_dict(), tmp_path / "deit_tiny.pth")
    wd = tmp_path / "teacher"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=xla_flags(1),
    )
    cmd = [
        sys.executable,
        "-m",
        "bvit_jax.interop.timm",
        "--timm_model=deit_tiny_patch16_224",
        f"--checkpoint={tmp_path / 'deit_tiny.pth'}",
        f"--workdir={wd}",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"--config.distill.teacher_workdir={wd}" in out.stdout

    config = json.loads((wd / "config.json").read_text())
    assert config["model"]["variant"] == "deit_tiny" and config["model"]["preset"] == "fp"
    assert {k: v for k, v in config["model"]["overrides"].items() if v is not None} == {"depth": 1}
    assert (config["data"]["image_size"], config["data"]["channels"], config["model"]["num_classes"]) == (224, 3, 1000)
    assert json.loads((wd / "import_report.json").read_text())["left_at_init"] == {}

    # Restored through the trainer's own path, the teacher gives timm's logits.
    from bvit_jax.train.trainer import load_teacher
    from configs import imagenet_deit

    student = imagenet_deit.get_config("deit_tiny,binaryvit")
    student.model.overrides = ml_collections.ConfigDict({"depth": 1})
    student.distill.teacher_workdir = str(wd)
    graphdef, params = load_teacher(student)
    x_torch, x_jax = _images(2, 224)
    with torch.no_grad():
        want = tm(x_torch).numpy()
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, params)(x_jax)), want, atol=1e-4, rtol=0)
    assert restore_params(wd)[0] == config

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr
