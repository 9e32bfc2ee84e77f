"""The optimizer chain and gradient accumulation: masks, GRS placement, lr scaling, micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from bvit_jax.grad_accum import accumulated_value_and_grad, split_micro_batches
from bvit_jax.models import create, get_preset
from bvit_jax.optim import applied_learning_rate, build_optimizer, learning_rate_schedule, weight_decay_mask
from bvit_jax.param_groups import flatten_with_paths, latent_weight_mask
from tests.tolerances import U32
from tests.train_helpers import tiny_config


def _tiny(preset: str):
    model = create(
        "vit_micro_28", preset, num_classes=10, image_size=28, in_channels=1, embed_dim=32, depth=1, num_heads=2
    )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return params, latent_weight_mask(model, params)


def _one_update(preset: str, grads_fn, **fields):
    """Params after one update of the trainer's chain from ``grads_fn(params)``."""
    params, latent = _tiny(preset)
    cfg = tiny_config(preset, **fields)
    tx = build_optimizer(
        cfg, params, latent, use_grs=get_preset(preset).grs, total_steps=10, warmup_steps=0, grs_warmup_steps=0
    )
    state = tx.init(params)
    updates, state = tx.update(grads_fn(params), state, params)
    return params, optax.apply_updates(params, updates), latent, state


# ----------------------------------------------------------------------------- weight decay
def test_weight_decay_touches_exactly_the_fp_matrices_and_never_latent_binary_weights():
    # Zero gradients: AdamW's only effect is the decay p <- p - lr * wd * p where the mask allows it.
    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
    before, after, latent, state = _one_update(
        "binaryvit", zeros, optimizer__weight_decay=0.5, optimizer__clip_norm=0.0, grs__strength=0.0
    )
    lr = float(applied_learning_rate(state))
    assert lr > 0
    decayed = []
    for (path, p0), (_, p1), (_, lat) in zip(
        flatten_with_paths(before), flatten_with_paths(after), flatten_with_paths(latent)
    ):
        p0, p1 = np.asarray(p0), np.asarray(p1)
        if np.array_equal(p0, p1):
            continue
        decayed.append(path)
        assert not lat, f"latent binary weight {path} was decayed"
        # One multiply and one subtract in float32: relative error <= 2u.
        np.testing.assert_allclose(p1, p0 * (1 - lr * 0.5), rtol=4 * U32, atol=0, err_msg=path)
    assert sorted(decayed) == ["head/kernel", "patch_embed/kernel"]
    # The mask function states the same rule: matrices only, not tokens/embeddings/latent kernels.
    params, latent = _tiny("binaryvit")
    mask = dict(flatten_with_paths(weight_decay_mask(params, latent)))
    assert {k for k, v in mask.items() if v} == {"head/kernel", "patch_embed/kernel"}


# ----------------------------------------------------------------------------- GRS placement
@pytest.mark.parametrize(
    "preset, expect_grs", [("baseline", False), ("baseline+asm", False), ("baseline+grs", True), ("binaryvit", True)]
)
def test_grs_moves_only_latent_weights_and_only_in_presets_that_ask_for_it(preset, expect_grs):
    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
    before, after, latent, _ = _one_update(
        preset, zeros, optimizer__weight_decay=0.0, optimizer__clip_norm=0.0, grs__strength=1e-3
    )
    moved = {
        path
        for (path, a), (_, b) in zip(flatten_with_paths(before), flatten_with_paths(after))
        if not np.array_equal(a, b)
    }
    latent_paths = {path for path, lat in flatten_with_paths(latent) if lat}
    if not expect_grs:
        assert moved == set()
        return
    assert moved == latent_paths
    # With zero data gradient the step follows the GRS gradient (|W| - alpha) sign(W): a weight
    # inside (-alpha, alpha) moves away from 0, one outside moves towards 0 (Adam keeps the sign).
    for path in latent_paths:
        w0 = np.asarray(dict(flatten_with_paths(before))[path])
        w1 = np.asarray(dict(flatten_with_paths(after))[path])
        alpha = np.abs(w0).mean(axis=0, keepdims=True)
        outward = np.abs(w0) < alpha
        assert np.all(np.abs(w1)[outward] >= np.abs(w0)[outward]), path
        assert np.all(np.abs(w1)[~outward] <= np.abs(w0)[~outward]), path


def test_config_presets_set_grs_strength_only_for_grs_presets():
    for preset in ("fp", "baseline", "baseline+grs", "baseline+asm", "binaryvit"):
        cfg = tiny_config(preset)
        assert (cfg.grs.strength > 0) == get_preset(preset).grs, preset


# ----------------------------------------------------------------------------- learning rate
def test_learning_rate_scales_with_the_batch_of_one_update_and_follows_warmup_then_cosine():
    o = ml_collections.ConfigDict(dict(base_lr=1e-3, lr_reference_batch=512, min_lr=1e-6))
    total, warm = 100, 10
    small = learning_rate_schedule(o, total, warm, global_batch_size=256)
    large = learning_rate_schedule(o, total, warm, global_batch_size=1024)
    assert float(small(warm)) == pytest.approx(0.5e-3, rel=1e-6)
    assert float(large(warm)) == pytest.approx(2e-3, rel=1e-6)
    assert float(large(0)) == 0.0
    assert float(large(warm // 2)) == pytest.approx(1e-3, rel=1e-6)  # linear warm-up
    mid = warm + (total - warm) // 2  # cosine: half-way between peak and floor
    assert float(large(mid)) == pytest.approx((2e-3 + 1e-6) / 2, rel=1e-5)
    assert float(large(total)) == pytest.approx(1e-6, rel=1e-5)


# ----------------------------------------------------------------------------- accumulation
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
