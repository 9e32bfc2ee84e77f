"""The optimizer chain: GRS -> gradient clipping -> AdamW (-> freezing) (-> latent clip), with schedules.

    tx = chain(grs(lambda_t, mask=latent),          # only latent binary weights
                                                    # (or grs_adaptive: ReBNN's per-channel lambda)
               clip_by_global_norm(c),
               adamw(lr_t, b1, b2, wd, mask=decay),  # no decay on latent binary
                                                     # weights, norms, biases,
                                                     # shifts, tokens
               grs_decoupled(lambda_t, lr_t, mask=latent),  # instead of grs, grs.coupling='decoupled'
               freeze_oscillating(f_th, m, mask=latent),  # only if grs.freeze_threshold > 0
               clip_latent_weights(c_w, mask=latent))     # only if optimizer.latent_weight_clip > 0

The chain runs once per optimizer update, and every schedule (learning rate,
warm-up, GRS strength) counts optimizer updates. ``global_batch_size`` is the
batch of one update; with ``grad_accum_steps = k`` the trainer computes its
gradient from ``k`` micro-batches (:mod:`bvit_jax.train.grad_accum`) before calling
the chain, so accumulation changes memory, never the schedules.
The learning rate follows DeiT's linear scaling,
``lr = base_lr * global_batch_size / lr_reference_batch``, with linear warm-up
and cosine decay (Touvron et al., 2021); the first update already applies
``peak / warmup_steps`` (:func:`learning_rate_schedule`). AdamW sits inside
``optax.inject_hyperparams``, so the learning rate of the latest update is in
the optimizer state (:func:`applied_learning_rate`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from bvit_jax.nn.param_groups import path_mask
from bvit_jax.train.grs import freeze_oscillating, grs, grs_adaptive, grs_decoupled

__all__ = [
    "learning_rate_schedule",
    "grs_schedule",
    "GRS_SCHEDULES",
    "GRS_COUPLINGS",
    "peak_learning_rate",
    "weight_decay_mask",
    "build_optimizer",
    "applied_learning_rate",
    "clip_latent_weights",
]

NO_DECAY = (r"(^|/)pos_embed$", r"(^|/)cls_token$")
GRS_SCHEDULES = ("constant", "linear", "cosine", "lr")  # config.grs.schedule
GRS_COUPLINGS = ("coupled", "decoupled")  # config.grs.coupling


def learning_rate_schedule(opt_cfg, total_steps: int, warmup_steps: int, global_batch_size: int) -> optax.Schedule:
    """DeiT's schedule, linear warm-up to ``peak = base_lr * B / lr_reference_batch`` then cosine to ``min_lr``,
    with the first update already at ``peak / W``.

    Update ``t`` (``t = 0, 1, ...`` counts optimizer updates; the value optax
    passes) applies the schedule at ``s = t + 1``, the number of updates made
    once it is applied (``W = warmup_steps``, ``T = total_steps``):

        lr_t = peak * (t + 1) / W                                            t + 1 <= W
        lr_t = min_lr + (peak - min_lr) * (1 + cos(pi * (t + 1 - W) / (T - W))) / 2    t + 1 >  W

    so the first update moves the weights (``peak / W``; an update at
    ``lr = 0``, as ``optax.warmup_cosine_decay_schedule(init_value=0)`` at
    ``t = 0`` gives, would only advance Adam's moments), the warm-up reaches
    ``peak`` at update ``W - 1`` and the last update, ``t = T - 1``, applies
    ``min_lr``. The warm-up of DeiT (Touvron et al., 2021; timm's scheduler,
    which steps per epoch from ``warmup_lr_init``) is linear from 0; here it
    starts one step in. ``B`` is the batch of one optimizer update (all
    micro-batches together).
    """
    peak = peak_learning_rate(opt_cfg, global_batch_size)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    from_zero = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=opt_cfg.min_lr,
    )
    return lambda count: from_zero(count + 1)


def peak_learning_rate(opt_cfg, global_batch_size: int) -> float:
    """DeiT's linear scaling: ``peak = base_lr * global_batch_size / lr_reference_batch``."""
    return opt_cfg.base_lr * global_batch_size / opt_cfg.lr_reference_batch


def grs_schedule(
    strength: float,
    warmup_steps: int = 0,
    *,
    kind: str = "constant",
    ramp_start: int = 0,
    ramp_steps: int = 0,
    learning_rate: optax.Schedule | None = None,
    peak_lr: float | None = None,
) -> optax.Schedule:
    """GRS ``lambda_t`` (``t`` counts optimizer updates from 0), ``config.grs.schedule = kind``.

    * ``"constant"``: ``lambda_t = strength``; with ``warmup_steps = W > 0`` a
      linear warm-up first, ``lambda_t = strength * min(t / W, 1)``
      (``optax.linear_schedule``; the form before schedules were added).
    * ``"linear"``: with ``B = ramp_start``, ``R = ramp_steps``,
      ``s = clip((t - B) / R, 0, 1)``: ``lambda_t = strength * s``;
    * ``"cosine"``: ``lambda_t = strength * (1 - cos(pi * s)) / 2``, a ramp with
      zero slope at both ends, the cosine annealing of Nagel et al. (ICML 2022)
      run upwards, from 0 to ``strength``;
    * ``"lr"``: ``lambda_t = strength * lr_t / peak_lr``, the learning rate's
      own shape (its warm-up, then its cosine decay), so the pull anneals with
      the steps it acts against (``learning_rate`` and ``peak_lr`` required).

    Both ramps are 0 up to and including ``t = B`` and exactly ``strength``
    from ``B + R`` on;
    ``R = 0`` switches ``lambda`` from 0 to ``strength`` at ``B``. ``"linear"``
    with ``B = 0, R = W`` is the constant schedule's warm-up. Built from optax
    schedules: ``join_schedules`` of ``constant_schedule(0)``, the ramp
    (``linear_schedule(0, strength, R)``, or ``strength -
    cosine_decay_schedule(strength, R)``) and ``constant_schedule(strength)``.
    """
    if kind not in GRS_SCHEDULES:
        raise ValueError(f"unknown GRS schedule {kind!r} (config field grs.schedule); choose one of {GRS_SCHEDULES}")
    if kind == "constant":
        if warmup_steps <= 0:
            return optax.constant_schedule(strength)
        return optax.linear_schedule(0.0, strength, warmup_steps)
    if kind == "lr":
        if learning_rate is None or not peak_lr or peak_lr <= 0:
            raise ValueError("the 'lr' GRS schedule needs the learning-rate schedule and a positive peak")
        if warmup_steps > 0 or ramp_start > 0 or ramp_steps > 0:
            raise ValueError("the 'lr' GRS schedule takes no warm-up or ramp of its own: it follows the learning rate")
        return lambda t: strength * (learning_rate(t) / peak_lr)
    if warmup_steps > 0:
        raise ValueError(f"grs.warmup_* belongs to the constant schedule; with schedule {kind!r} use grs.ramp_*")
    if ramp_start < 0 or ramp_steps < 0:
        raise ValueError(f"GRS ramp start and length must be >= 0, got {ramp_start}, {ramp_steps}")
    zero, full = optax.constant_schedule(0.0), optax.constant_schedule(strength)
    if ramp_steps == 0:
        return optax.join_schedules([zero, full], [ramp_start])
    if kind == "linear":
        ramp = optax.linear_schedule(0.0, strength, ramp_steps)
    else:
        decay = optax.cosine_decay_schedule(strength, ramp_steps)
        ramp = lambda t: strength - decay(t)  # strength * (1 - (1 + cos(pi t / R)) / 2)
    return optax.join_schedules([zero, ramp, full], [ramp_start, ramp_start + ramp_steps])


def weight_decay_mask(params: Any, latent_mask: Any) -> Any:
    """True where AdamW decays: matrices (ndim >= 2) that are not latent binary
    weights, position embedding or class token."""
    named = path_mask(params, NO_DECAY)
    return jax.tree.map(lambda p, lat, nd: p.ndim >= 2 and not lat and not nd, params, latent_mask, named)


def build_optimizer(
    config,
    params: Any,
    latent_mask: Any,
    *,
    total_steps: int,
    warmup_steps: int,
    grs_warmup_steps: int,
    grs_ramp_start_steps: int = 0,
    grs_ramp_steps: int = 0,
) -> optax.GradientTransformation:
    """The full chain from ``config.optimizer`` / ``config.grs``.

    GRS (when ``grs.strength > 0``: the config alone decides; the recipe
    sets it for the GRS presets, :data:`bvit_jax.train.recipes.PRESET_TRAINING`) follows
    :func:`grs_schedule` with ``grs.schedule``, added to the gradient
    (``grs.coupling='coupled'``, :func:`bvit_jax.train.grs.grs`; with
    ``grs.adaptive`` ReBNN's per-channel strength,
    :func:`bvit_jax.train.grs.grs_adaptive`, scaled by the schedule's shape
    ``lambda_t / strength``) or to AdamW's update
    (``'decoupled'``, :func:`bvit_jax.train.grs.grs_decoupled`); iterative freezing
    (:func:`bvit_jax.train.grs.freeze_oscillating`, ``grs.freeze_threshold > 0``,
    only if ``latent_mask`` marks any weight) is independent of GRS and goes
    last, after AdamW; then, with ``optimizer.latent_weight_clip = c > 0``,
    :func:`clip_latent_weights` projects the latent weights onto ``[-c, c]``.
    Durations are in optimizer updates;
    ``config.optimizer.grad_accum_steps`` is not seen here (the trainer
    accumulates before calling ``tx``).
    """
    o, g = config.optimizer, config.grs
    lr = learning_rate_schedule(o, total_steps, warmup_steps, config.global_batch_size)
    parts, after_adamw = [], []
    if g.strength > 0:
        lam = grs_schedule(
            g.strength,
            grs_warmup_steps,
            kind=g.get("schedule", "constant"),
            ramp_start=grs_ramp_start_steps,
            ramp_steps=grs_ramp_steps,
            learning_rate=lr,
            peak_lr=peak_learning_rate(o, config.global_batch_size),
        )
        if g.get("coupling", "coupled") == "decoupled":
            after_adamw.append(grs_decoupled(lam, lr, mask=latent_mask))
        elif g.get("adaptive", False):
            shape = lambda t: lam(t) / g.strength
            lo, hi = g.get("adaptive_min", 1e-5), g.get("adaptive_max", 2e-4)
            parts.append(grs_adaptive(lo, hi, shape, mask=latent_mask))
        else:
            parts.append(grs(lam, mask=latent_mask))
    if o.clip_norm:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    parts.append(
        adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=weight_decay_mask(params, latent_mask))
    )
    parts += after_adamw
    threshold = g.get("freeze_threshold", 0.0)
    if threshold > 0 and any(jax.tree.leaves(latent_mask)):
        parts.append(freeze_oscillating(threshold, g.get("freeze_momentum", 0.99), mask=latent_mask))
    limit = o.get("latent_weight_clip", 0.0) or 0.0
    if limit > 0 and any(jax.tree.leaves(latent_mask)):
        parts.append(clip_latent_weights(limit, mask=latent_mask))
    return optax.chain(*parts)


def clip_latent_weights(limit: float, mask: Any) -> optax.GradientTransformation:
    """Keep latent binary weights in ``[-c, c]``: the update becomes ``u' = clip(W + u, -c, c) - W``.

    Applied last in the chain, so ``W + u'`` (what ``optax.apply_updates``
    computes) is the projection of the updated weight onto the box; leaves
    where ``mask`` is False pass unchanged. The straight-through gradient of a
    binary weight is ``alpha * dL/dW_b * 1{|W| <= 1}`` (:mod:`bvit_jax.nn.binarize`),
    so a latent weight past ``|W| = 1`` gets no gradient again and keeps its
    sign for good (GRS still pulls it towards ``alpha``); with ``c <= 1``
    every latent weight stays where it is trained. This is larq's
    ``kernel_constraint="weight_clip"`` (clip to ``[-1, 1]`` after each
    update; Geiger & Team Plumerai, 2020), as BinaryConnect clips its weights
    (Courbariaux et al., 2015). ``config.optimizer.latent_weight_clip = c``
    (0: off).

    Float32: ``u' = c - W`` is exact when ``c/2 <= W <= 2c`` (Sterbenz's
    lemma), so a weight that crosses ``c`` within one update lands on ``c``
    exactly (and likewise at ``-c``); otherwise (an update larger than
    ``c/2`` across the bound) ``c - W`` rounds once, by at most ``2^-24 c``,
    so ``|W + u'|`` ends at most one float32 spacing past ``c``:
    ``|W + u'| <= c (1 + 2^-23)``.
    """
    if not limit > 0:
        raise ValueError(f"latent weight clip must be > 0, got {limit} (config field optimizer.latent_weight_clip)")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("clip_latent_weights needs the parameters: call tx.update(grads, state, params)")

        def project(u, w, m):
            if not m:
                return u
            return (jnp.clip(w + u, -limit, limit) - w).astype(u.dtype)

        return jax.tree.map(project, updates, params, mask), state

    return optax.GradientTransformation(init_fn, update_fn)


def applied_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate AdamW applied in its latest update (before any: the schedule at 0)."""
    return optax.tree_utils.tree_get(opt_state, "hyperparams")["learning_rate"]
