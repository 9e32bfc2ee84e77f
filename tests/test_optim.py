"""The optimizer chain: masks, GRS placement and schedules, freezing, lr scaling, and the checks of the GRS
config fields."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from bvit_jax.nn.models import create
from bvit_jax.nn.param_groups import flatten_with_paths, latent_weight_mask
from bvit_jax.train.grs import frozen_share, grs
from bvit_jax.train.optim import (
    applied_learning_rate,
    build_optimizer,
    grs_schedule,
    learning_rate_schedule,
    weight_decay_mask,
)
from bvit_jax.train.trainer import ConfigError, validate_config
from tests.tolerances import U32, assert_within, gamma_n
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
    tx = build_optimizer(cfg, params, latent, total_steps=10, warmup_steps=0, grs_warmup_steps=0)
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
    "preset, strength, expect_grs",
    [
        # the recipe's defaults: GRS in the GRS presets only
        ("baseline", None, False),
        ("baseline+asm", None, False),
        ("baseline+grs", None, True),
        ("binaryvit", None, True),
        # the config alone decides, whatever the preset
        ("baseline", 1e-3, True),
        ("binaryvit", 0.0, False),
    ],
)
def test_grs_moves_only_latent_weights_and_only_when_the_config_asks_for_it(preset, strength, expect_grs):
    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
    fields = dict(optimizer__weight_decay=0.0, optimizer__clip_norm=0.0)
    if strength is not None:
        fields["grs__strength"] = strength
    before, after, latent, _ = _one_update(preset, zeros, **fields)
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


# ----------------------------------------------------------------------------- learning rate
def test_learning_rate_scales_with_the_batch_of_one_update_and_follows_warmup_then_cosine():
    """Update t applies the schedule at t + 1: peak (t + 1) / W in the warm-up, then the cosine, min_lr at the
    last update t = T - 1. (rel 1e-6 / 1e-5: a few float32 roundings of optax's schedule arithmetic.)"""
    o = ml_collections.ConfigDict(dict(base_lr=1e-3, lr_reference_batch=512, min_lr=1e-6))
    total, warm = 100, 10
    small = learning_rate_schedule(o, total, warm, global_batch_size=256)
    large = learning_rate_schedule(o, total, warm, global_batch_size=1024)
    assert float(small(warm - 1)) == pytest.approx(0.5e-3, rel=1e-6)
    assert float(large(warm - 1)) == pytest.approx(2e-3, rel=1e-6)
    assert float(large(0)) == pytest.approx(2e-3 / warm, rel=1e-6)  # the first update is not at lr 0
    for t in range(warm):  # linear warm-up, one step in
        assert float(large(t)) == pytest.approx(2e-3 * (t + 1) / warm, rel=1e-6)
    mid = warm + (total - warm) // 2 - 1  # cosine: half-way between peak and floor
    assert float(large(mid)) == pytest.approx((2e-3 + 1e-6) / 2, rel=1e-5)
    assert float(large(total - 1)) == pytest.approx(1e-6, rel=1e-5)  # the last update applies min_lr
    no_warm = 1e-6 + (2e-3 - 1e-6) * (1 + np.cos(np.pi / total)) / 2  # W = 0: the cosine at t + 1 = 1
    assert float(learning_rate_schedule(o, total, 0, 1024)(0)) == pytest.approx(no_warm, rel=1e-5)


def test_the_first_update_of_the_warm_up_moves_every_trainable_weight():
    """With a warm-up the trainer's first update applies peak / W (logged as lr) and changes every parameter
    that gets a nonzero gradient; the schedule at 0, as before this change, would have applied lr 0."""
    params, latent = _tiny("fp")
    cfg = tiny_config("fp")
    tx = build_optimizer(cfg, params, latent, total_steps=10, warmup_steps=4, grs_warmup_steps=0)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    peak = cfg.optimizer.base_lr * cfg.global_batch_size / cfg.optimizer.lr_reference_batch
    assert float(applied_learning_rate(state)) == pytest.approx(peak / 4, rel=1e-6)
    new = optax.apply_updates(params, updates)
    for (path, a), (_, b) in zip(flatten_with_paths(new), flatten_with_paths(params)):
        assert np.all(np.asarray(a) != np.asarray(b)), path


# ----------------------------------------------------------------------------- GRS schedules
S = 1e-4  # strength


def _ramp(kind, t, start, length):
    """The documented lambda_t of a ramp, in float64."""
    s = np.clip((np.asarray(t, np.float64) - start) / length, 0.0, 1.0)
    return S * s if kind == "linear" else S * (1 - np.cos(np.pi * s)) / 2


def test_grs_schedule_constant_is_today_s_form_with_its_optional_linear_warmup():
    t = jnp.arange(0, 40)
    assert all(grs_schedule(S, 0)(int(i)) == S for i in (0, 1, 7, 10**6))  # optax.constant_schedule(S)
    # the default kind, with the warm-up of before: the very same optax schedule, bitwise
    np.testing.assert_array_equal(grs_schedule(S, 8)(t), optax.linear_schedule(0.0, S, 8)(t))
    assert float(grs_schedule(S, 8)(0)) == 0.0
    assert float(grs_schedule(S, 8)(4)) == pytest.approx(S / 2, rel=4 * U32)
    assert float(grs_schedule(S, 8)(8)) == np.float32(S)
    with pytest.raises(ValueError, match="grs.schedule"):
        grs_schedule(S, kind="exponential")
    with pytest.raises(ValueError, match="grs.ramp"):
        grs_schedule(S, 8, kind="linear", ramp_steps=8)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_grs_schedule_ramps_from_zero_over_the_window_then_holds_the_strength(kind):
    start, length = 20, 40
    sched = grs_schedule(S, kind=kind, ramp_start=start, ramp_steps=length)
    t = np.arange(0, start + length + 30)
    got = np.asarray(sched(jnp.asarray(t)), np.float64)
    # Exact outside the window: 0 up to and including its start, the strength from its end on.
    np.testing.assert_array_equal(got[: start + 1], 0.0)
    np.testing.assert_array_equal(got[start + length :], np.float32(S))
    # Inside, the formula within float32 rounding: linear, strength * (1 - c/R) has ~5 roundings
    # of size <= u*S (S itself, c/R, 1 - ., the product, the sum); cosine, strength - strength *
    # (1 + cos(pi c/R)) / 2 adds the float32 pi and the argument's two roundings (|d/dx| <= S/2,
    # so <= 1.5 pi u S), cos and pow to a few ulp: 32 u S bounds both with margin.
    assert_within(got, _ramp(kind, t, start, length), 32 * U32 * S, kind)
    # The chosen points, by the formula: a quarter, half and three quarters of the window.
    quarter = {"linear": [0.25, 0.5, 0.75], "cosine": [(1 - np.sqrt(0.5)) / 2, 0.5, (1 + np.sqrt(0.5)) / 2]}[kind]
    for frac, value in zip([0.25, 0.5, 0.75], quarter):
        assert float(sched(start + int(frac * length))) == pytest.approx(S * value, abs=32 * U32 * S)
    assert np.all(np.diff(got) >= 0)  # never decreases


def test_grs_schedule_linear_ramp_from_zero_is_the_constant_warmup_and_a_zero_length_ramp_is_a_step():
    t = jnp.arange(0, 30)
    np.testing.assert_array_equal(grs_schedule(S, kind="linear", ramp_steps=8)(t), grs_schedule(S, 8)(t))
    step = np.asarray(grs_schedule(S, kind="cosine", ramp_start=12)(t))
    np.testing.assert_array_equal(step[:12], 0.0)
    np.testing.assert_array_equal(step[12:], np.float32(S))


def _old_chain(cfg, params, latent, total, warm, grs_warm):
    """The chain as it was built before GRS schedules and freezing existed, written out."""
    o, s = cfg.optimizer, cfg.grs.strength
    lam = optax.constant_schedule(s) if grs_warm <= 0 else optax.linear_schedule(0.0, s, grs_warm)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    return optax.chain(
        grs(lam, mask=latent),
        optax.clip_by_global_norm(o.clip_norm),
        adamw(
            learning_rate_schedule(o, total, warm, cfg.global_batch_size),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=weight_decay_mask(params, latent),
        ),
    )


@pytest.mark.parametrize("grs_warm", [0, 3])
def test_default_grs_fields_build_bitwise_the_chain_of_before(grs_warm):
    params, latent = _tiny("binaryvit")
    cfg = tiny_config("binaryvit", grs__strength=1e-2)
    assert cfg.grs.schedule == "constant" and cfg.grs.freeze_threshold == 0.0  # the defaults
    new = build_optimizer(cfg, params, latent, total_steps=10, warmup_steps=2, grs_warmup_steps=grs_warm)
    old = _old_chain(cfg, params, latent, 10, 2, grs_warm)
    s_new, s_old = new.init(params), old.init(params)
    assert jax.tree.structure(s_new) == jax.tree.structure(s_old)
    rng = np.random.default_rng(0)
    p_new = p_old = params
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        u_new, s_new = new.update(grads, s_new, p_new)
        u_old, s_old = old.update(grads, s_old, p_old)
        jax.tree.map(np.testing.assert_array_equal, u_new, u_old)
        p_new, p_old = optax.apply_updates(p_new, u_new), optax.apply_updates(p_old, u_old)
    jax.tree.map(np.testing.assert_array_equal, p_new, p_old)


@pytest.mark.parametrize(
    "kind, start, length, first_move", [("linear", 2, 3, 3), ("cosine", 2, 3, 3), ("linear", 2, 0, 2)]
)
def test_grs_schedule_fields_reach_the_chain(kind, start, length, first_move):
    # Zero data gradient, no decay: latent weights move only once lambda_t > 0, i.e. first at
    # update t = start + 1 of a ramp (lambda_start = 0), at t = start for a zero-length ramp.
    params, latent = _tiny("baseline+grs")
    cfg = tiny_config(
        "baseline+grs", grs__strength=1e-3, grs__schedule=kind, optimizer__weight_decay=0.0, optimizer__clip_norm=0.0
    )
    tx = build_optimizer(
        cfg,
        params,
        latent,
        total_steps=20,
        warmup_steps=0,
        grs_warmup_steps=0,
        grs_ramp_start_steps=start,
        grs_ramp_steps=length,
    )
    state, p = tx.init(params), params
    zeros = jax.tree.map(jnp.zeros_like, params)
    for t in range(first_move + 1):
        upd, state = tx.update(zeros, state, p)
        moved = {k for k, u in flatten_with_paths(upd) if np.any(np.asarray(u) != 0)}
        assert moved == (set() if t < first_move else {k for k, lat in flatten_with_paths(latent) if lat}), t
        p = optax.apply_updates(p, upd)


def test_grs_schedule_lr_in_the_chain_divides_by_the_batch_scaled_peak():
    """``grs.schedule='lr'``: lambda_t = strength * lr_t / peak with the peak the schedule climbs to,
    ``base_lr * global_batch / lr_reference_batch`` (here a quarter of base_lr). Zero data gradient, and
    Adam's eps far above the gradient, so the first update is -lr_0 * g / (|g| + eps) with g the pull
    lambda_0 * (|W| - alpha) sign(W): the pull's strength shows in the update (it would not with Adam's
    usual eps, which normalises it away)."""
    from bvit_jax.train.optim import learning_rate_schedule

    params, latent = _tiny("baseline+grs")
    strength, eps = 1e-3, 1e3
    cfg = tiny_config(
        "baseline+grs",
        grs__strength=strength,
        grs__schedule="lr",
        optimizer__weight_decay=0.0,
        optimizer__clip_norm=0.0,
        optimizer__eps=eps,
    )
    o = cfg.optimizer
    tx = build_optimizer(cfg, params, latent, total_steps=20, warmup_steps=4, grs_warmup_steps=0)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    lr0 = float(learning_rate_schedule(o, 20, 4, cfg.global_batch_size)(0))
    peak = o.base_lr * cfg.global_batch_size / o.lr_reference_batch
    assert cfg.global_batch_size * 4 == o.lr_reference_batch  # so a peak of base_lr would give 4x the pull
    lam0 = strength * lr0 / peak
    u, w, m = dict(flatten_with_paths(upd)), dict(flatten_with_paths(params)), dict(flatten_with_paths(latent))
    for k in (k for k in u if m[k]):
        wk = np.asarray(w[k], np.float64)
        alpha = np.abs(wk).mean(axis=0)  # float64: the code's float32 mean is within gamma_n(n) * alpha of it
        g = lam0 * (np.abs(wk) - alpha) * np.where(wk >= 0, 1.0, -1.0)
        ref = -lr0 * g / (np.abs(g) + eps)
        # float32: the pull's products and difference, Adam's two moments, their bias corrections, sqrt, + eps,
        # the divide and the lr product: 16 roundings of U32 relative at most; and |W| - alpha inherits alpha's
        # error (the mean over the n inputs, gamma_n(n) * alpha), which is not relative where |W| ~ alpha.
        bound = gamma_n(16) * np.abs(ref) + lr0 / eps * lam0 * gamma_n(wk.shape[0]) * alpha
        assert_within(u[k], ref, bound, k)


# ----------------------------------------------------------------------------- iterative freezing
def _flip_grads(p):
    """sign(W): AdamW's first update is -lr * sign(W), so every weight with |W| < lr flips."""
    return jax.tree.map(lambda w: jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype), p)


@pytest.mark.parametrize("preset, strength", [("baseline", 0.0), ("binaryvit", 1e-3)])  # without and with GRS
def test_freezing_fields_put_it_last_in_the_chain_on_latent_weights_only(preset, strength):
    params, latent = _tiny(preset)
    # peak lr = base_lr * 32 / 128 = 0.0125, about the median |W| of the latent kernels: many flip, not all
    fields = dict(
        optimizer__weight_decay=0.0, optimizer__clip_norm=0.0, optimizer__base_lr=0.05, grs__strength=strength
    )
    kw = dict(total_steps=10, warmup_steps=0, grs_warmup_steps=0)
    off = build_optimizer(tiny_config(preset, **fields), params, latent, **kw)
    # momentum 0: f_t = flipped_t, so threshold 0.5 freezes a weight at its first flip
    cfg_on = tiny_config(preset, **fields, grs__freeze_threshold=0.5, grs__freeze_momentum=0.0)
    on = build_optimizer(cfg_on, params, latent, **kw)
    grads = _flip_grads(params)
    u_off, s_off = off.update(grads, off.init(params), params)
    u_on, s_on = on.update(grads, on.init(params), params)
    assert frozen_share(s_off) is None
    lat = dict(flatten_with_paths(latent))
    n_flip = n_lat = 0
    for (path, w), (_, a), (_, b) in zip(
        flatten_with_paths(params), flatten_with_paths(u_off), flatten_with_paths(u_on)
    ):
        w, a, b = np.asarray(w), np.asarray(a), np.asarray(b)
        flips = (w + a >= 0) != (w >= 0)
        if not lat[path]:  # never frozen, flipped or not
            np.testing.assert_array_equal(b, a, err_msg=path)
            continue
        # AdamW's final update, zeroed exactly where it flips a latent sign: the freezing comes after AdamW
        np.testing.assert_array_equal(b, np.where(flips, 0.0, a), err_msg=path)
        n_flip, n_lat = n_flip + flips.sum(), n_lat + flips.size
    assert 0 < n_flip < n_lat
    assert float(frozen_share(s_on)) == pytest.approx(n_flip / n_lat, rel=1e-6)
    # Later updates, whatever the gradient, leave the frozen weights where they are.
    p_on = optax.apply_updates(params, u_on)
    u2, _ = on.update(jax.tree.map(lambda g: -100.0 * g, grads), s_on, p_on)
    frozen = dict(flatten_with_paths(optax.tree_utils.tree_get(s_on, "frozen")))  # latent leaves only
    assert set(frozen) == {k for k, v in lat.items() if v}
    u2 = dict(flatten_with_paths(u2))
    for path, fr in frozen.items():
        np.testing.assert_array_equal(np.asarray(u2[path])[np.asarray(fr)], 0.0, err_msg=path)
        assert np.all(np.asarray(u2[path])[~np.asarray(fr)] != 0), path


def test_freezing_is_not_added_without_latent_weights():
    params, latent = _tiny("fp")
    cfg = tiny_config("fp", grs__freeze_threshold=0.5)
    tx = build_optimizer(cfg, params, latent, total_steps=10, warmup_steps=0, grs_warmup_steps=0)
    assert frozen_share(tx.init(params)) is None


# ----------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(grs__schedule="cosin"), "config.grs.schedule='cosin' is unknown"),
        (dict(grs__schedule="linear", grs__ramp_steps=-1), "config.grs.ramp_steps=-1 is negative"),
        (dict(grs__schedule="cosine", grs__ramp_start_epochs=-0.5), "config.grs.ramp_start_epochs=-0.5 is negative"),
        (dict(grs__schedule="linear", grs__warmup_steps=5), "warm-up of schedule 'constant'"),
        (dict(grs__ramp_steps=10), "only apply to config.grs.schedule='linear' or 'cosine'"),
        (dict(grs__freeze_threshold=1.0), r"config.grs.freeze_threshold=1.0 must be in \[0, 1\)"),
        (dict(grs__freeze_threshold=-0.1), r"config.grs.freeze_threshold=-0.1 must be in \[0, 1\)"),
        (dict(grs__freeze_momentum=1.0), r"config.grs.freeze_momentum=1.0 must be in \[0, 1\)"),
        (dict(grs__schedule="lr", grs__ramp_steps=10), "follows the learning rate"),
        (dict(grs__coupling="after"), "config.grs.coupling='after' is unknown"),
        (dict(grs__adaptive=True, grs__coupling="decoupled"), "needs config.grs.coupling='coupled'"),
        (dict(grs__adaptive=True, grs__adaptive_min=1e-3), "must satisfy 0 <= min <= max"),
        (dict(grs__adaptive=True), "config.grs.adaptive needs config.grs.strength > 0"),  # fp: strength 0
        (dict(grs__strength=1.0, grs__coupling="decoupled", grs__schedule="lr"), "it would follow lr_t\\^2"),
    ],
)
def test_validate_config_rejects_bad_grs_variant_fields(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config("fp", **fields), 1, 1)


def test_validate_config_accepts_the_grs_variants():
    for fields in (
        dict(),
        dict(grs__warmup_steps=10),
        dict(grs__schedule="linear", grs__ramp_start_steps=5, grs__ramp_steps=10),
        dict(grs__schedule="cosine", grs__ramp_epochs=2.0),
        dict(grs__freeze_threshold=0.02, grs__freeze_momentum=0.99),
        dict(grs__schedule="lr"),
        dict(grs__coupling="decoupled", grs__schedule="cosine", grs__ramp_start_steps=5),
        dict(grs__adaptive=True, grs__strength=1e-5, grs__adaptive_min=0.0, grs__adaptive_max=1e-4),
    ):
        validate_config(tiny_config("fp", **fields), 1, 1)


# ----------------------------------------------------------------------------- latent weight clip
def _clip_chain_update(limit, scale=1.0):
    """One update of the binaryvit chain with and without the latent clip, from latent weights set near +-1."""
    params, latent = _tiny("binaryvit")
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda p, m: jnp.asarray(rng.uniform(-1.0, 1.0, p.shape), p.dtype) if m else p, params, latent
    )
    grads = jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), params)
    out = {}
    for c in (0.0, limit):
        cfg = tiny_config("binaryvit", optimizer__latent_weight_clip=c, optimizer__base_lr=0.5)
        tx = build_optimizer(cfg, params, latent, total_steps=10, warmup_steps=0, grs_warmup_steps=0)
        updates, _ = tx.update(grads, tx.init(params), params)
        out[c] = optax.apply_updates(params, updates)
    return params, latent, out[0.0], out[limit]


def test_latent_weight_clip_projects_latent_weights_onto_the_box_and_leaves_the_rest():
    """``optimizer.latent_weight_clip = c``: each latent weight ends at clip(W + u, -c, c) of the chain without
    the clip: exactly c / -c where it crossed from within a factor 2 of the bound (Sterbenz: c - W exact),
    one float32 spacing past c at worst otherwise; inside the box and on every other leaf, bit for bit."""
    c = 0.8
    params, latent, free, clipped = _clip_chain_update(c)
    crossed = 0
    for (path, w0), (_, f), (_, g), (_, m) in zip(
        flatten_with_paths(params), flatten_with_paths(free), flatten_with_paths(clipped), flatten_with_paths(latent)
    ):
        w0, f, g = np.asarray(w0), np.asarray(f), np.asarray(g)
        if not m:
            np.testing.assert_array_equal(g, f, err_msg=path)
            continue
        inside = np.abs(f) <= c
        np.testing.assert_array_equal(g[inside], f[inside], err_msg=path)
        near = ~inside & (np.abs(w0) >= c / 2) & (np.sign(w0) == np.sign(f))
        np.testing.assert_array_equal(g[near], np.sign(f[near]) * np.float32(c), err_msg=path)
        assert np.all(np.abs(g) <= np.float32(c) * (1 + 2.0**-23)), path
        crossed += int((~inside).sum())
    assert crossed > 100  # lr 0.5 pushes many weights past c


def test_latent_weight_clip_is_absent_by_default_and_not_added_without_latent_weights():
    params, latent = _tiny("fp")
    cfg = tiny_config("fp", optimizer__latent_weight_clip=1.0)
    with_clip = build_optimizer(cfg, params, latent, total_steps=10, warmup_steps=0, grs_warmup_steps=0)
    without = build_optimizer(tiny_config("fp"), params, latent, total_steps=10, warmup_steps=0, grs_warmup_steps=0)
    assert jax.tree.structure(with_clip.init(params)) == jax.tree.structure(without.init(params))
    assert tiny_config("binaryvit").optimizer.latent_weight_clip == 0.0  # off by default


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(optimizer__latent_weight_clip=-1.0), "config.optimizer.latent_weight_clip=-1.0 must be a finite number"),
        (dict(optimizer__latent_weight_clip=float("inf")), "latent_weight_clip=inf must be a finite number"),
        (dict(model__drop_path_rate=1.0), r"config.model.drop_path_rate=1.0 must be a number in \[0, 1\)"),
        (dict(model__drop_path_rate=-0.1), r"config.model.drop_path_rate=-0.1 must be a number in \[0, 1\)"),
        (dict(model__remat_policy="ful"), "config.model.remat_policy='ful' is unknown; choose one of"),
    ],
)
def test_validate_config_rejects_bad_drop_path_remat_and_clip_fields(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config("fp", **fields), 1, 1)
    validate_config(tiny_config("fp", model__drop_path_rate=0.1, model__remat_policy="full"), 1, 1)


# ----------------------------------------------------------------------------- GRS strength options in the chain
def _grs_terms(preset: str, grads_scale: float, **fields):
    """The GRS term of one update of the configured chain on the latent weights: the update with GRS
    minus the update of the same chain without it (same gradients, same parameters)."""
    params, latent = _tiny(preset)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(grads_scale * rng.normal(size=p.shape), p.dtype), params)
    out = {}
    for strength in (0.0, 1e-2):
        cfg = tiny_config(preset, grs__strength=strength, optimizer__clip_norm=0.0, **fields)
        tx = build_optimizer(cfg, params, latent, total_steps=10, warmup_steps=0, grs_warmup_steps=0)
        out[strength], _ = tx.update(grads, tx.init(params), params)
    terms = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), out[1e-2], out[0.0])
    return params, latent, terms


def test_decoupled_grs_moves_latent_weights_by_lr_lambda_whatever_the_gradient_scale():
    """After AdamW the pull is ``-lr_t * lambda * (|W| - alpha) sign(W)`` exactly as written, at gradient
    scales 1 and 1000 alike; added to the gradient (coupled) its effect on Adam's normalised update
    shrinks as the gradient grows (it is divided by about |g|)."""
    from bvit_jax.train.grs import grs_direction

    lr0 = float(learning_rate_schedule(tiny_config("binaryvit").optimizer, 10, 0, 16)(0))  # the first update's
    for scale in (1.0, 1000.0):
        params, latent, terms = _grs_terms("binaryvit", scale, grs__coupling="decoupled", global_batch_size=16)
        for (path, t), (_, w), (_, m) in zip(
            flatten_with_paths(terms), flatten_with_paths(params), flatten_with_paths(latent)
        ):
            if not m:
                np.testing.assert_array_equal(t, 0.0, err_msg=path)
                continue
            want = -lr0 * 1e-2 * np.asarray(grs_direction(w), np.float64)
            # lr*lambda, its product with the direction, the subtraction from Adam's update (|u| <= ~lr),
            # and the difference of two float32 updates: within 4 u (|term| + lr) of the exact term.
            assert_within(t, want, 4 * U32 * (np.abs(want) + 2 * lr0), f"decoupled {path} at scale {scale}")
    coupled = [_grs_terms("binaryvit", s, global_batch_size=16)[2] for s in (1.0, 1000.0)]
    size = [max(float(np.max(np.abs(t))) for _, t in flatten_with_paths(c)) for c in coupled]
    assert size[1] < size[0] / 100  # coupled: the same lambda is ~1000x weaker against 1000x gradients


def test_adaptive_grs_in_the_chain_starts_at_its_floor_on_every_latent_weight():
    """At the first update no sign has changed yet (p = 0), so ReBNN's lambda is its floor on every channel:
    the chain's gradient is ``g + lo * (|W| - alpha) sign(W)`` before clipping and AdamW."""
    from bvit_jax.train.grs import AdaptiveGRSState

    params, latent = _tiny("binaryvit")
    cfg = tiny_config("binaryvit", grs__adaptive=True, grs__adaptive_min=3e-5, grs__adaptive_max=1e-4)
    tx = build_optimizer(cfg, params, latent, total_steps=10, warmup_steps=0, grs_warmup_steps=0)
    state = tx.init(params)
    states = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, AdaptiveGRSState))]
    assert any(isinstance(s, AdaptiveGRSState) for s in states)
    first = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)[0]
    same = build_optimizer(
        tiny_config("binaryvit", grs__strength=3e-5), params, latent, total_steps=10, warmup_steps=0, grs_warmup_steps=0
    )
    ref = same.update(jax.tree.map(jnp.zeros_like, params), same.init(params), params)[0]
    for (path, a), (_, b) in zip(flatten_with_paths(first), flatten_with_paths(ref)):
        np.testing.assert_array_equal(a, b, err_msg=path)  # the same float32 operations: lo * direction
