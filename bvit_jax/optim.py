"""The optimizer chain: GRS -> gradient clipping -> AdamW, with schedules.

    tx = chain(grs(lambda_t, mask=latent),          # only latent binary weights
               clip_by_global_norm(c),
               adamw(lr_t, b1, b2, wd, mask=decay))  # no decay on latent binary
                                                     # weights, norms, biases,
                                                     # shifts, tokens

The chain runs once per optimizer update, and every schedule (learning rate,
warm-up, GRS strength) counts optimizer updates. ``global_batch_size`` is the
batch of one update; with ``grad_accum_steps = k`` the trainer computes its
gradient from ``k`` micro-batches (:mod:`bvit_jax.grad_accum`) before calling
the chain, so accumulation changes memory, never the schedules.
The learning rate follows DeiT's linear scaling,
``lr = base_lr * global_batch_size / lr_reference_batch``, with linear warm-up
and cosine decay (Touvron et al., 2021). AdamW sits inside
``optax.inject_hyperparams``, so the learning rate of the latest update is in
the optimizer state (:func:`applied_learning_rate`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from bvit_jax.grs import grs
from bvit_jax.param_groups import path_mask

__all__ = ["learning_rate_schedule", "grs_schedule", "weight_decay_mask", "build_optimizer", "applied_learning_rate"]

NO_DECAY = (r"(^|/)pos_embed$", r"(^|/)cls_token$")


def learning_rate_schedule(opt_cfg, total_steps: int, warmup_steps: int, global_batch_size: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``base_lr * B / lr_reference_batch``, then cosine to ``min_lr``.

    ``B`` is the batch of one optimizer update (all micro-batches together);
    ``total_steps`` and ``warmup_steps`` count optimizer updates.
    """
    peak = opt_cfg.base_lr * global_batch_size / opt_cfg.lr_reference_batch
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=opt_cfg.min_lr,
    )


def grs_schedule(strength: float, warmup_steps: int) -> optax.Schedule:
    """GRS ``lambda_t``: linear warm-up from 0 over ``warmup_steps``, then constant."""
    if warmup_steps <= 0:
        return optax.constant_schedule(strength)
    return optax.linear_schedule(0.0, strength, warmup_steps)


def weight_decay_mask(params: Any, latent_mask: Any) -> Any:
    """True where AdamW decays: matrices (ndim >= 2) that are not latent binary
    weights, position embedding or class token."""
    named = path_mask(params, NO_DECAY)
    return jax.tree.map(lambda p, lat, nd: p.ndim >= 2 and not lat and not nd, params, latent_mask, named)


def build_optimizer(
    config, params: Any, latent_mask: Any, *, use_grs: bool, total_steps: int, warmup_steps: int, grs_warmup_steps: int
) -> optax.GradientTransformation:
    """The full chain from ``config.optimizer`` / ``config.grs``.

    Durations are in optimizer updates; ``config.optimizer.grad_accum_steps``
    is not seen here (the trainer accumulates before calling ``tx``).
    """
    o = config.optimizer
    lr = learning_rate_schedule(o, total_steps, warmup_steps, config.global_batch_size)
    parts = []
    if use_grs and config.grs.strength > 0:
        parts.append(grs(grs_schedule(config.grs.strength, grs_warmup_steps), mask=latent_mask))
    if o.clip_norm:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    parts.append(
        adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=weight_decay_mask(params, latent_mask))
    )
    return optax.chain(*parts)


def applied_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate AdamW applied in its latest update (before any: the schedule at 0)."""
    return optax.tree_utils.tree_get(opt_state, "hyperparams")["learning_rate"]
