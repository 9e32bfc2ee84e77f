"""The trainer: config errors, the teacher, multi-process parity, NaN, the recipe's presets, the foldable branch
norms (affine, batchnorm), accuracy. (Loss, checkpoint-store, accumulation, sharding and preemption tests are in
their modules' files.)"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bvit_jax.runs.workdir import restore_params
from bvit_jax.train.metric_writers import read_metrics
from bvit_jax.train.trainer import ConfigError, load_teacher, train_and_evaluate
from tests.train_helpers import eval_top1, flat, tiny_config


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(model__preset="binaryvt"), "config.model.preset='binaryvt' is unknown"),
        (dict(model__variant="deit_huge"), "config.model.variant='deit_huge' is unknown"),
        (dict(global_batch_size=30, mesh__data=8), "not divisible by the 8 devices"),
        (dict(grs__strength=-1.0), "GRS strength must be >= 0"),
        (dict(model__dtype="float16"), "use 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'"),
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
    # Normalisation and resize interpolation count too (the teacher is fed the student's batches); a
    # per-channel list equal to the teacher's single value does not.
    for field, value, named in (("mean", (0.5,), "data.mean"), ("interpolation", "nearest", "data.interpolation")):
        cfg = tiny_config("binaryvit", distill__teacher_workdir=str(teacher), **{f"data__{field}": value})
        with pytest.raises(ConfigError, match=f"{named}=.*the student uses {named}="):
            train_and_evaluate(cfg, tmp_path / f"d_{field}")


def test_the_teacher_forward_runs_in_the_configured_dtype(tmp_path, teacher):
    """``distill.teacher_dtype``: empty keeps the teacher run's float32; ``bfloat16`` computes its forward in
    bfloat16 with float32 parameters and float32 logits; anything else is refused before compiling."""
    models = {}
    for dtype in ("", "bfloat16"):
        graphdef, params = load_teacher(
            tiny_config("binaryvit", distill__teacher_workdir=str(teacher), distill__teacher_dtype=dtype)
        )
        assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
        models[dtype] = nnx.merge(graphdef, params)
    x = jnp.zeros((2, 28, 28, 1), jnp.float32)
    assert models[""].features(x).dtype == jnp.float32
    assert models["bfloat16"].features(x).dtype == jnp.bfloat16
    assert models["bfloat16"](x).dtype == jnp.float32
    cfg = tiny_config("binaryvit", distill__teacher_workdir=str(teacher), distill__teacher_dtype="float16")
    with pytest.raises(ConfigError, match="teacher_dtype='float16'"):
        train_and_evaluate(cfg, tmp_path / "d")


# ----------------------------------------------------------------------------- multi-process


# (The multi-process runs, a binary preset with its teacher on 2 processes, are in tests/test_multihost.py.)


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


def test_a_non_finite_step_leaves_the_batchnorm_statistics_as_they_were():
    """The non-finite guard covers ``batch_stats``: a NaN batch changes neither parameters nor running averages
    (a finite one moves both), and the step reports itself non-finite."""
    from bvit_jax.nn.param_groups import latent_weight_mask
    from bvit_jax.runs.workdir import build_model
    from bvit_jax.train.optim import build_optimizer
    from bvit_jax.train.trainer import init_train_state, make_train_step, split_for_training

    cfg = tiny_config("binaryvit", total_steps=4, distill__enabled=False, model__overrides__branch_norm="batchnorm")
    model = build_model(cfg)
    graphdef, params, stats = split_for_training(model)
    latent = latent_weight_mask(model, params)
    tx = build_optimizer(cfg, params, latent, total_steps=4, warmup_steps=1, grs_warmup_steps=0)
    step = jax.jit(make_train_step(cfg, graphdef, latent, tx))
    state = init_train_state(params, tx, latent, stats)
    labels = jnp.arange(8) % 10
    batch = {
        "image": jax.random.normal(jax.random.key(0), (8, 28, 28, 1)),
        "label": jax.nn.one_hot(labels, 10),
        "label_index": labels,
    }
    good, m_good = step(state, batch, None)
    bad, m_bad = step(state, {**batch, "image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}, None)
    assert int(m_good["nonfinite"]) == 0 and int(m_bad["nonfinite"]) == 1
    before, after_good, after_bad = flat(state["batch_stats"]), flat(good["batch_stats"]), flat(bad["batch_stats"])
    assert before.keys() == after_bad.keys() and len(before) == 12  # mean, var of 6 block linears
    for k in before:
        np.testing.assert_array_equal(after_bad[k], before[k], err_msg=k)
        assert not np.array_equal(after_good[k], before[k]), k
    for k, v in flat(bad["params"]).items():
        np.testing.assert_array_equal(v, flat(state["params"])[k], err_msg=k)


# ----------------------------------------------------------------------------- recipe
def _train_in_memory(preset: str, strength: float, steps: int = 40, batch: int = 32):
    """``steps`` updates of the trainer's own step (:func:`make_train_step`, jitted) on ``configs/fashion_mnist.py:
    PRESET,tiny`` without KD, on fixed in-memory batches (random images, labels 0..9 cycled): ``(init params,
    final params, [metrics of each step])``. The trainer's loop around it (input, checkpoints, logging) has
    tests of its own; this is the recipe's arithmetic only."""
    from bvit_jax.nn.param_groups import latent_weight_mask
    from bvit_jax.runs.workdir import build_model
    from bvit_jax.train.optim import build_optimizer
    from bvit_jax.train.trainer import init_train_state, make_train_step, split_for_training

    cfg = tiny_config(preset, total_steps=steps, warmup_steps=2, distill__enabled=False, grs__strength=strength)
    model = build_model(cfg)
    graphdef, params, stats = split_for_training(model)
    latent = latent_weight_mask(model, params)
    tx = build_optimizer(cfg, params, latent, total_steps=steps, warmup_steps=2, grs_warmup_steps=0)
    step = jax.jit(make_train_step(cfg, graphdef, latent, tx))
    state, rows = init_train_state(params, tx, latent, stats), []
    labels = jnp.arange(batch) % 10
    for i in range(steps):
        images = jax.random.normal(jax.random.key(i % 8), (batch, 28, 28, 1))  # 8 batches, 5 epochs of them
        state, metrics = step(
            state, {"image": images, "label": jax.nn.one_hot(labels, 10), "label_index": labels}, None
        )
        rows.append({k: float(v) for k, v in metrics.items()})
    return flat(params), flat(state["params"]), rows


def test_grs_lowers_the_flip_rate_and_each_binary_preset_trains_differently():
    """Same seed and data, KD off: the presets differ only by their switches, and each switch shows."""
    runs = {
        name: _train_in_memory(preset, strength)
        for name, preset, strength in [
            ("baseline", "baseline", 0.0),
            ("grs", "baseline+grs", 1e-2),
            ("asm", "baseline+asm", 0.0),
            ("binaryvit", "binaryvit", 1e-2),
        ]
    }
    late_flips = {k: np.mean([r["flip_rate/all"] for r in rows[20:]]) for k, (_, _, rows) in runs.items()}
    # GRS switched on cuts late sign flips several-fold (strength 0 is no GRS: tests/test_optim.py).
    assert late_flips["baseline"] > 0
    assert late_flips["grs"] * 4 <= late_flips["baseline"], late_flips
    assert late_flips["binaryvit"] * 4 <= late_flips["asm"], late_flips
    # ASM adds parameters that learn, and changes the training trajectory.
    init, trained = runs["asm"][0], runs["asm"][1]
    asm_keys = trained.keys() - runs["baseline"][1].keys()
    assert asm_keys and asm_keys <= runs["binaryvit"][1].keys()
    assert all(not np.array_equal(trained[k], init[k]) for k in asm_keys), asm_keys
    losses = {k: [r["loss"] for r in rows] for k, (_, _, rows) in runs.items()}
    names = sorted(losses)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert losses[a] != losses[b], (a, b)


@pytest.mark.parametrize("branch_norm", ["affine", "batchnorm"])
def test_foldable_branch_norm_trains_resumes_and_exports_bit_exact(tmp_path, branch_norm):
    """``model.overrides.branch_norm`` = ``affine`` / ``batchnorm``: the per-channel scale and bias of every block
    linear's branch learn (each moves off its init 1 / 0), the checkpoint holds them under ``norm/`` and no
    LayerNorm there; a BatchNorm's running averages are in the train state (``batch_stats``, moved off their
    init 0 / 1), in the best checkpoint beside the parameters, and a BatchNorm run resumed from its step-4
    checkpoint (with 2 micro-batches per step, each with its own statistics) ends bit for bit where the
    uninterrupted one does; the trained run's ``.bvit`` file gives the model's eval logits bit for bit on CPU."""
    import shutil

    from bvit_jax.deploy.export import export_workdir, load_packed
    from bvit_jax.deploy.packed import packed_forward
    from bvit_jax.runs.workdir import restore

    cfg = tiny_config(
        "binaryvit",
        total_steps=8,
        warmup_steps=1,
        distill__enabled=False,
        diagnostics_every_steps=0,
        checkpoint_every_steps=4,
        eval_every_steps=8,
        optimizer__grad_accum_steps=2,
        model__overrides__branch_norm=branch_norm,
    )
    final = train_and_evaluate(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run", "train")
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    params = flat(restore_params(tmp_path / "run", "latest")[1])
    branch = {k: v for k, v in params.items() if re.fullmatch(r"blocks/\d+/(attn|mlp)/\w+/norm/scale", k)}
    assert len(branch) == 6, sorted(params)  # depth 1: q, k, v, proj, fc1, fc2
    for k, v in branch.items():
        assert not np.array_equal(v, np.ones_like(v)), k
        assert not np.array_equal(params[k[: -len("scale")] + "bias"], np.zeros_like(v)), k
        stats = {n: params.get(k[: -len("scale")] + n) for n in ("mean", "var")}
        if branch_norm == "batchnorm":
            assert not np.array_equal(stats["mean"], np.zeros_like(v)) and np.all(stats["var"] > 0), k
            assert not np.array_equal(stats["var"], np.ones_like(v)), k
        else:
            assert stats == {"mean": None, "var": None}, k
    config, model, best = restore(str(tmp_path / "run"), which="best", dtype=jnp.float32)
    assert model.opts.branch_norm == branch_norm
    assert eval_top1(model, cfg) == final["top1"]  # the trainer evaluated the model as restored (running averages)
    for k, v in flat(best).items():  # the only eval is at the last step: best == latest, statistics included
        np.testing.assert_array_equal(v, params[k], err_msg=k)
    assert flat(best).keys() == params.keys()
    # BatchNorm: resumed from step 4 (its later checkpoints and best removed), the running averages come back
    # from the checkpoint: the same end, bit for bit. (A statistics-free affine resumes as any model does:
    # tests/test_multihost.py, tests/test_preemption.py.)
    if branch_norm == "batchnorm":
        shutil.copytree(tmp_path / "run", tmp_path / "resumed")
        shutil.rmtree(tmp_path / "resumed" / "best")
        checkpoints = (tmp_path / "resumed" / "checkpoints").iterdir()
        for step in (p for p in checkpoints if p.name.isdigit() and p.name != "4"):
            shutil.rmtree(step)
        assert train_and_evaluate(cfg, tmp_path / "resumed") == final
        resumed = flat(restore_params(tmp_path / "resumed", "latest")[1])
        assert resumed.keys() == params.keys()
        for k in params:
            np.testing.assert_array_equal(resumed[k], params[k], err_msg=k)
    # export folds the normalisation (a BatchNorm's running-average map) into each linear: bit-exact logits
    export_workdir(tmp_path / "run", tmp_path / "m.bvit", which="latest")
    packed = load_packed(tmp_path / "m.bvit")
    assert packed.opts.branch_norm == branch_norm
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
