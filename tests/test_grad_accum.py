"""Gradient accumulation (:mod:`bvit_jax.train.grad_accum`): strided micro-batches, the accumulated loss and
gradient against the full batch, and the trainer's k micro-batches against one large batch.

Float comparisons use bounds derived from float32 summation error (each test states its derivation;
see ``tests/tolerances.py``), not tuned tolerances.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bvit_jax.runs.workdir import restore_params
from bvit_jax.train.grad_accum import accumulated_value_and_grad, split_micro_batches
from bvit_jax.train.metric_writers import read_metrics
from bvit_jax.train.trainer import train_and_evaluate
from tests.tolerances import U32
from tests.train_helpers import flat, tiny_config


def test_micro_batches_are_strided_rows_so_sharded_rows_stay_on_their_device():
    x = jnp.arange(12 * 2).reshape(12, 2)
    micro = split_micro_batches({"x": x}, 3)["x"]
    assert micro.shape == (3, 4, 2)
    for i in range(3):
        np.testing.assert_array_equal(micro[i], x[i::3])
    with pytest.raises(ValueError, match="does not split into 5"):
        split_micro_batches({"x": x}, 5)


def test_accumulated_loss_and_gradient_equal_the_full_batch_within_float32_summation_error():
    # Least squares with a per-example mean: L = 1/B sum_b (w.x_b - y_b)^2, plus an aux mean.
    rng = np.random.default_rng(0)
    B, d, k = 64, 16, 4
    batch = {
        "x": jnp.asarray(rng.normal(size=(B, d)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(B,)), jnp.float32),
    }
    w = jnp.asarray(rng.normal(size=(d,)), jnp.float32)

    def loss_fn(w, batch, scale):
        r = batch["x"] @ w - batch["y"]
        return scale * jnp.mean(r**2), {"mean_residual": jnp.mean(r)}

    (l1, a1), g1 = accumulated_value_and_grad(loss_fn, 1)(w, batch, 2.0)
    (lk, ak), gk = jax.jit(accumulated_value_and_grad(loss_fn, k))(w, batch, 2.0)

    # Float32 bound: each residual is a d-term dot product and each mean a B-term
    # sum; reassociating a sum of n terms changes it by at most n*u*sum|terms|
    # (Higham, Accuracy and Stability of Numerical Algorithms, 2002, eq. 4.4),
    # so both results are within (d + B + 2) * u * (mean of |per-example term|)
    # of the exact value, and of each other within twice that.
    per_example_grad = jax.vmap(jax.grad(lambda w, x, y: 2.0 * (x @ w - y) ** 2), (None, 0, 0))(
        w, batch["x"], batch["y"]
    )
    r = batch["x"] @ w - batch["y"]
    n = d + B + 2
    g_bound = 2 * n * U32 * np.mean(np.abs(per_example_grad), axis=0)
    assert np.all(np.abs(np.asarray(gk - g1)) <= g_bound)
    assert abs(float(lk - l1)) <= 2 * n * U32 * float(np.mean(2.0 * r**2))
    assert abs(float(ak["mean_residual"] - a1["mean_residual"])) <= 2 * n * U32 * float(np.mean(np.abs(r)))


@pytest.mark.parametrize("k", [1, 3])
def test_the_state_passes_through_the_micro_batches_in_order(k):
    """``has_state``: micro-batch ``i`` starts from the state micro-batch ``i - 1`` left (a BatchNorm's running
    averages); loss, aux and gradient are the micro-batch means. Every value here is a small integer or a
    power-of-two fraction, so float32 computes it exactly and the comparison is exact."""
    x = jnp.arange(1.0, 13.0)  # 12 rows -> k micro-batches of rows i::k

    def fun(w, state, batch):
        loss = jnp.mean(w * batch) + 0.5 * state  # depends on the state it was given
        return loss, ({"rows": jnp.mean(batch)}, 0.5 * state + jnp.sum(batch))

    (loss, aux), grad, state = accumulated_value_and_grad(fun, k, has_state=True)(jnp.float32(2.0), 4.0, x)
    want_state, losses, means = 4.0, [], []
    for i in range(k):
        rows = np.arange(1.0, 13.0)[i::k]
        losses.append(np.mean(2.0 * rows) + 0.5 * want_state)
        means.append(np.mean(rows))
        want_state = 0.5 * want_state + rows.sum()
    assert float(state) == want_state
    assert float(loss) == np.mean(losses) and float(aux["rows"]) == np.mean(means)
    assert float(grad) == np.mean(means)  # d/dw mean(w * rows) = mean(rows), averaged over micro-batches


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


def test_drop_path_draws_do_not_depend_on_the_micro_batch_split():
    """Rate 0.5 on a depth-2 fp ViT: one step with k = 4 micro-batches of 8 equals the step with one batch of
    32 up to the summation bound of ``test_gradient_accumulation_equals_one_large_batch_update_for_update``
    (each example keeps its drop keys, keyed by its row in the global batch), while the same step at rate 0
    lands outside that bound (the drop is really on)."""
    from bvit_jax.nn.param_groups import latent_weight_mask
    from bvit_jax.runs.workdir import build_model
    from bvit_jax.train.optim import build_optimizer
    from bvit_jax.train.trainer import init_train_state, make_train_step, split_for_training

    labels = jnp.arange(32) % 10
    batch = {
        "image": jax.random.normal(jax.random.key(0), (32, 28, 28, 1)),
        "label": jax.nn.one_hot(labels, 10),
        "label_index": labels,
    }
    out = {}
    for k, rate in ((1, 0.5), (4, 0.5), (1, 0.0)):
        cfg = tiny_config("fp", optimizer__grad_accum_steps=k, model__overrides__depth=2, model__drop_path_rate=rate)
        model = build_model(cfg)
        graphdef, params, stats = split_for_training(model)
        latent = latent_weight_mask(model, params)
        tx = build_optimizer(cfg, params, latent, total_steps=4, warmup_steps=1, grs_warmup_steps=0)
        _, metrics = jax.jit(make_train_step(cfg, graphdef, latent, tx))(
            init_train_state(params, tx, latent), batch, None
        )
        out[k, rate] = float(metrics["loss"])
    delta = 4 * 32 * 50 * U32  # as above: ~4 chained reductions of at most B*T terms, reassociated
    assert abs(out[4, 0.5] - out[1, 0.5]) <= delta * out[1, 0.5]
    assert abs(out[1, 0.0] - out[1, 0.5]) > delta * out[1, 0.5]  # measured 2.3x the bound at init (loss ~ ln 10)
