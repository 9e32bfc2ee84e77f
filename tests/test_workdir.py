"""The run folder (bvit_jax.runs.workdir): config.json, the model of a config, and restoring a trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from bvit_jax.errors import ConfigError
from bvit_jax.runs.checkpoint import CheckpointError
from bvit_jax.runs.workdir import (
    abstract_params,
    build_model,
    config_dict,
    has_config,
    load_config,
    restore,
    restore_params,
    save_model,
    write_config,
)
from bvit_jax.train.trainer import train_and_evaluate
from tests.train_helpers import ROOT, eval_top1, flat, tiny_config


def _shapes(tree):
    return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict, ml_collections.ConfigDict]:
    """A tiny binaryvit run (no teacher), evaluated once at its end: (workdir, final eval, config)."""
    wd = tmp_path_factory.mktemp("run")
    cfg = tiny_config("binaryvit", total_steps=4, distill__enabled=False)
    return wd, train_and_evaluate(cfg, wd), cfg


# ----------------------------------------------------------------------------- config.json
def test_config_json_round_trip_and_a_folder_without_one(tmp_path):
    cfg = tiny_config("binaryvit")
    assert not has_config(tmp_path)
    path = write_config(tmp_path / "new", cfg)  # creates the folder
    assert path == tmp_path / "new" / "config.json" and has_config(tmp_path / "new")
    saved = load_config(tmp_path / "new")
    assert saved == json.loads(cfg.to_json_best_effort()) == config_dict(cfg)
    assert saved["model"]["overrides"]["asm"] is None  # unset placeholders are kept, as null
    write_config(tmp_path / "again", saved)  # a dict writes the same JSON
    assert load_config(tmp_path / "again") == saved
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_config(tmp_path)


def test_saved_config_json_builds_the_same_model():
    """``config.json`` keeps the None placeholders as null; read back it builds the same model
    (the teacher's path) and the same parameter shapes (``abstract_params``: restore and export)."""
    argv = [
        "train.py",
        f"--config={ROOT / 'configs' / 'fashion_mnist.py'}:binaryvit,tiny",
        "--config.model.overrides.patch_size=4",
        "--config.model.overrides.act_binarizer=ste",
    ]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    config = fv["config"].value
    saved = json.loads(config.to_json_best_effort(indent=2))
    assert saved["model"]["overrides"]["patch_size"] == 4
    assert saved["model"]["overrides"]["asm"] is None and saved["model"]["overrides"]["embed_dim"] == 32
    again = build_model(saved)
    first = build_model(config)
    assert again.cfg == first.cfg and again.opts == first.opts
    assert first.cfg.patch_size == 4 and first.opts.act_binarizer == "ste"
    jax.tree.map(np.testing.assert_array_equal, _params(first), _params(again))
    assert _shapes(abstract_params(saved)) == _shapes(_params(first))
    # and the JSON survives a second round trip unchanged
    assert json.loads(ml_collections.ConfigDict(saved).to_json_best_effort()) == saved


# ----------------------------------------------------------------------------- the model of a config
def test_build_model_concrete_abstract_seed_and_dtype():
    cfg = tiny_config("binaryvit")
    model = build_model(cfg, seed=1)
    abstract = build_model(cfg, seed=1, abstract=True)
    assert _shapes(_params(abstract)) == _shapes(_params(model))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(_params(abstract)))
    other = build_model(cfg, seed=2)
    assert not np.array_equal(np.asarray(model.pos_embed[...]), np.asarray(other.pos_embed[...]))
    assert model.opts.dtype == jnp.float32  # the config's model.dtype
    cfg.model.dtype = "bfloat16"
    bf16 = build_model(cfg, abstract=True)
    assert bf16.opts.dtype == jnp.bfloat16
    assert build_model(cfg, dtype="float32", abstract=True).opts.dtype == jnp.float32
    assert _shapes(_params(bf16)) == _shapes(_params(model))  # parameters stay float32
    with cfg.unlocked():
        cfg.model.overrides = ml_collections.ConfigDict({"embd_dim": 8})
    with pytest.raises(ConfigError, match="embd_dim"):
        build_model(cfg, abstract=True)


# ----------------------------------------------------------------------------- restoring a trained run
def test_restored_model_scores_what_the_trainer_measured(run):
    wd, final, cfg = run
    config, model, params = restore(wd)  # best: the only eval is at the last step
    assert config == load_config(wd) and config["model"]["preset"] == "binaryvit"
    assert (model.cfg.embed_dim, model.cfg.depth, model.opts.asm) == (32, 1, True)
    assert eval_top1(model, cfg) == final["top1"] and final["examples"] == 400
    # the params returned are those inside the model, and restore_params reads the same ones
    jax.tree.map(np.testing.assert_array_equal, params, _params(model))
    assert flat(restore_params(wd)[1]).keys() == flat(params).keys()
    for k, v in flat(restore_params(wd)[1]).items():
        np.testing.assert_array_equal(v, flat(params)[k], err_msg=k)
    # the model is the run's (trained), not a fresh initialisation of the same config
    fresh = _params(build_model(cfg, seed=cfg.seed))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(params)))


def test_best_falls_back_to_the_latest_train_state(run, tmp_path):
    wd, _, _ = run
    latest = flat(restore(wd, "latest").params)
    copy = tmp_path / "copy"
    shutil.copytree(wd, copy)
    shutil.rmtree(copy / "best")  # no eval has run
    best = flat(restore(copy, "best").params)
    assert best.keys() == latest.keys()
    for k in latest:
        np.testing.assert_array_equal(best[k], latest[k], err_msg=k)
    with pytest.raises(ValueError, match="which must be 'best' or 'latest'"):
        restore(copy, "last")


def test_restoring_logs_no_orbax_warnings(run, caplog):
    # The quick start loads its teacher this way; orbax logs through absl -> logging.
    wd, _, _ = run
    with caplog.at_level("WARNING"):
        restore_params(wd, "best")
        restore(wd, "latest")
    assert caplog.records == [], [r.getMessage() for r in caplog.records]


def test_a_folder_with_a_config_but_no_checkpoint(tmp_path):
    write_config(tmp_path, tiny_config("fp"))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        restore(tmp_path)


# ----------------------------------------------------------------------------- writing a model
def test_saved_model_restores_with_equal_outputs(tmp_path):
    cfg = tiny_config("binaryvit")
    model = build_model(cfg, seed=3)
    # every parameter off its initial value, so a restore that re-initialised anything would show
    moved = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(p.size), p.shape), _params(model))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, moved)
    nnx.update(model, state)
    assert save_model(tmp_path / "wd", cfg, model) == tmp_path / "wd"
    config, again, params = restore(tmp_path / "wd")
    assert config == config_dict(cfg)
    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(model(x)))
    jax.tree.map(np.testing.assert_array_equal, params, _params(model))
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        save_model(tmp_path / "wd", cfg, model)


def test_save_model_refuses_a_config_of_another_model(tmp_path):
    cfg = tiny_config("binaryvit")
    model = build_model(cfg)
    cfg.model.overrides.embed_dim = 48
    with pytest.raises(ValueError, match="does not describe this model"):
        save_model(tmp_path, cfg, model)
    assert not has_config(tmp_path) and not (tmp_path / "best").exists()
