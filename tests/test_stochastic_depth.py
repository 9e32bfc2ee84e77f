"""Stochastic depth in the trainer (``config.model.drop_path_rate``): the train step drops with the documented
per-example keys, a resumed run equals the uninterrupted one bit for bit, and the eval is untouched.

(The drop itself, its schedule and the model without keys: ``tests/test_layers.py``, ``tests/test_models.py``;
with micro-batches: ``tests/test_grad_accum.py``; on 8 devices: ``tests/test_sharding.py``.)
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from bvit_jax.nn.models import drop_path_keys
from bvit_jax.nn.param_groups import latent_weight_mask
from bvit_jax.runs.workdir import build_model
from bvit_jax.train.losses import cross_entropy
from bvit_jax.train.metric_writers import read_metrics
from bvit_jax.train.optim import build_optimizer
from bvit_jax.train.trainer import init_train_state, make_train_step, split_for_training, train_and_evaluate
from tests.tolerances import gamma_n
from tests.train_helpers import assert_same_run, tiny_config

B = 8


def _step_and_state(rate: float):
    cfg = tiny_config("fp", model__overrides__depth=2, model__drop_path_rate=rate)
    model = build_model(cfg)
    graphdef, params, stats = split_for_training(model)
    latent = latent_weight_mask(model, params)
    tx = build_optimizer(cfg, params, latent, total_steps=4, warmup_steps=1, grs_warmup_steps=0)
    return cfg, graphdef, jax.jit(make_train_step(cfg, graphdef, latent, tx)), init_train_state(params, tx, latent)


def _batch():
    labels = jnp.arange(B) % 10
    image = jax.random.normal(jax.random.key(0), (B, 28, 28, 1))
    return {"image": image, "label": jax.nn.one_hot(labels, 10), "label_index": labels}


def test_the_train_step_drops_with_the_keys_of_seed_step_and_row_and_the_rate_changes_the_loss():
    """Step 0 of a depth-2 fp ViT with rate 0.5 (block 1 drops at 0.5): the logged loss is the
    cross-entropy of the model called with ``drop_path_keys(seed, 0, rows 0..B-1)``, and not the loss of
    rate 0 (same parameters: the rate is no parameter).

    Bound: the step's forward and this one run the same float32 operations in two XLA programs, which may
    sum in other orders; the loss is a mean over B examples of log-softmax over 10 logits, each a chain of
    ~10 sums over at most n = 17 tokens x 128 channels, so |delta| <= 10 * gamma_n * loss (u = 2^-24), below
    the change a different mask makes (asserted)."""
    cfg, graphdef, step, state = _step_and_state(0.5)
    _, _, step0, state0 = _step_and_state(0.0)
    batch = _batch()
    _, metrics = step(state, batch, None)
    _, metrics0 = step0(state0, batch, None)
    keys = drop_path_keys(cfg.seed, jnp.int32(0), jnp.arange(B))
    forward = jax.jit(lambda p, x, k: nnx.merge(graphdef, p)(x, drop_path_keys=k))
    expected = float(cross_entropy(forward(state["params"], batch["image"], keys), batch["label"]))
    bound = 10 * gamma_n(17 * 128) * abs(expected)
    assert abs(float(metrics["loss"]) - expected) <= bound
    plain = float(cross_entropy(forward(state["params"], batch["image"], None), batch["label"]))
    assert abs(float(metrics0["loss"]) - plain) <= bound  # rate 0: the deterministic forward
    assert abs(float(metrics["loss"]) - float(metrics0["loss"])) > bound
    # the other step's keys draw another mask: a different loss
    other = float(
        cross_entropy(
            forward(state["params"], batch["image"], drop_path_keys(cfg.seed, 1, jnp.arange(B))), batch["label"]
        )
    )
    assert abs(other - expected) > bound


def test_a_drop_path_run_resumed_from_its_checkpoint_ends_bit_for_bit_where_the_uninterrupted_one_does(tmp_path):
    """Rate 0.5, depth 2, two micro-batches per step: resumed from the step-4 checkpoint (later ones removed),
    the run repeats every loss and ends with the same parameters, bit for bit: the drop keys are a function of
    (seed, step, row), nothing new in the checkpoint."""
    cfg = tiny_config(
        "baseline",
        total_steps=8,
        warmup_steps=1,
        distill__enabled=False,
        diagnostics_every_steps=0,
        checkpoint_every_steps=4,
        eval_every_steps=8,
        optimizer__grad_accum_steps=2,
        model__overrides__depth=2,
        model__drop_path_rate=0.5,
    )
    final = train_and_evaluate(cfg, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "best")
    for step in (p for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit() and p.name != "4"):
        shutil.rmtree(step)
    assert train_and_evaluate(cfg, tmp_path / "resumed") == final
    assert_same_run(tmp_path / "full", tmp_path / "resumed", 8)
    # the share of latent weights outside the STE window is logged every step (inside at init, lr ~1e-3)
    assert [r["outside_window/all"] for r in read_metrics(tmp_path / "full", "train")] == [0.0] * 8
