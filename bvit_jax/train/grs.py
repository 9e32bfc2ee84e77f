"""GRS: the gradient regularization scheme, as an optax gradient transformation.

Binary training oscillates when latent weights sit near the sign boundary
(0) and keep flipping. GRS (``docs/method.md``, "GRS") adds to the gradient of
every latent binary weight

    g <- g + lambda * (|W| - alpha) * sign(W),   alpha = mean(|W|) per output channel

which is exactly the gradient of ``lambda/2 * sum (|W| - alpha)^2`` (the
derivative of ``alpha`` drops out because ``sum_in (|W| - alpha) = 0`` per
channel). Weights inside ``(-alpha, alpha)`` are pushed outward and far ones
pulled back, so the latent distribution becomes bimodal around ``+-alpha`` and
fewer weights keep flipping sign. Chain it before the optimizer:

    tx = optax.chain(grs(1e-4, mask=mask), optax.clip_by_global_norm(1.0), optax.adamw(...))

``lambda`` may follow a schedule (:func:`bvit_jax.train.optim.grs_schedule`: constant,
a linear / cosine ramp-up from 0, or the learning rate's shape). Two other forms
of the same pull:

* :func:`grs_adaptive`: ReBNN's per-channel strength (Xu et al., AAAI 2023),
  ``lambda_i = clip(p_i * max_j |g_ij|, lo, hi)`` with ``p_i`` the share of
  channel ``i``'s weights whose sign changed in the last update, so the pull
  fades as a channel's signs settle;
* :func:`grs_decoupled`: the pull applied after the optimizer, as AdamW applies
  its weight decay, ``W <- W - lr_t * lambda_t * (|W| - alpha) sign(W)``: a
  term added to the gradient is rescaled by Adam's second moment, this one is
  not.

The comparison point of Nagel et al.
(ICML 2022, Sec. 4.2), iterative freezing of weights whose EMA sign-flip
frequency passes a threshold, is :func:`freeze_oscillating`; it acts on the
final update, so it goes last:

    tx = optax.chain(..., optax.adamw(...), freeze_oscillating(0.02, 0.99, mask=mask))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bvit_jax.nn.binarize import channel_alpha, sign

__all__ = [
    "grs",
    "grs_penalty",
    "grs_direction",
    "GRSState",
    "grs_adaptive",
    "AdaptiveGRSState",
    "channel_flip_share",
    "adaptive_strength",
    "grs_decoupled",
    "freeze_oscillating",
    "FreezeState",
    "frozen_share",
]


class GRSState(NamedTuple):
    count: jax.Array  # number of updates so far (drives a lambda schedule)


def grs_direction(w: jax.Array) -> jax.Array:
    """``(|W| - alpha) * sign(W)`` with ``sign(0) = +1``: the GRS gradient per unit lambda."""
    return (jnp.abs(w) - channel_alpha(w)) * sign(w)


def grs_penalty(w: jax.Array) -> jax.Array:
    """``1/2 * sum (|W| - alpha)^2``: the penalty whose gradient GRS adds."""
    return 0.5 * jnp.sum((jnp.abs(w) - channel_alpha(w)) ** 2)


def grs(strength: float | optax.Schedule, mask: Any = None) -> optax.GradientTransformation:
    """GRS as an ``optax.GradientTransformation``.

    ``update(g, state, params)`` returns ``g + lambda_t * (|W| - alpha) * sign(W)``
    on the leaves selected by ``mask`` and ``g`` on every other leaf.

    Args:
      strength: ``lambda`` (>= 0), or a schedule ``step -> lambda`` (e.g.
        ``optax.linear_schedule(0, 1e-4, 1000)`` to warm it up).
      mask: a boolean pytree like the params (see
        :func:`bvit_jax.nn.param_groups.latent_weight_mask`) or a callable
        ``params -> mask``; ``None`` applies GRS to every leaf.
    """
    if not callable(strength) and strength < 0:
        raise ValueError(f"GRS strength must be >= 0, got {strength} (config field grs.strength)")
    schedule = _as_schedule(strength)

    def init_fn(params):
        del params
        return GRSState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("grs needs the parameters: call tx.update(grads, state, params)")
        lam = schedule(state.count)
        new = jax.tree.map(lambda g, w: g + (lam * grs_direction(w)).astype(g.dtype), updates, params)
        return new, GRSState(count=optax.safe_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def _as_schedule(value: float | optax.Schedule) -> optax.Schedule:
    return value if callable(value) else (lambda _: value)


def channel_flip_share(w: jax.Array, prev_positive: jax.Array) -> jax.Array:
    """``p_i``: the share of output channel ``i``'s weights whose sign differs from ``prev_positive``.

    ``prev_positive`` is ``W_prev >= 0`` (``sign(0) = +1``); the mean runs
    over every axis but the last (a ``(in, out)`` kernel's inputs), keepdims.
    """
    changed = (w >= 0) != prev_positive
    return jnp.mean(changed.astype(jnp.float32), axis=tuple(range(w.ndim - 1)), keepdims=True)


def adaptive_strength(g: jax.Array, p: jax.Array, lo: float, hi: float) -> jax.Array:
    """ReBNN's per-channel strength ``lambda_i = clip(p_i * max_j |g_ij|, lo, hi)`` (keepdims, like ``p``).

    ``g`` is the loss gradient of the kernel, ``j`` runs over the channel's
    inputs (every axis but the last). Xu et al. (AAAI 2023) clip to
    ``[1e-5, 2e-4]``.
    """
    gmax = jnp.max(jnp.abs(g.astype(jnp.float32)), axis=tuple(range(g.ndim - 1)), keepdims=True)
    return jnp.clip(p * gmax, lo, hi)


class AdaptiveGRSState(NamedTuple):
    count: jax.Array  # number of updates so far (drives the schedule's shape)
    prev_positive: Any  # per weight: W >= 0 at the previous update


def grs_adaptive(
    lo: float = 1e-5, hi: float = 2e-4, shape: float | optax.Schedule = 1.0, mask: Any = None
) -> optax.GradientTransformation:
    """GRS with ReBNN's per-channel, flip-driven strength (Xu et al., AAAI 2023), as optax.

    Per latent kernel ``W_t`` (params of update ``t``) and loss gradient ``g``:

        p_i      = share of channel i's weights with sign(W_t) != sign(W_{t-1})   (p = 0 at t = 0)
        lambda_i = s_t * clip(p_i * max_j |g_ij|, lo, hi)
        g_ij    <- g_ij + lambda_i * (|W_ij| - alpha_i) * sign(W_ij)

    (:func:`channel_flip_share`, :func:`adaptive_strength`, :func:`grs_direction`).
    A channel whose signs stopped changing gets the floor ``lo``; one that
    flips a lot gets up to ``hi``. ``s_t`` (``shape``, a number or a
    schedule in ``[0, 1]``) scales every channel, e.g. the delayed ramp of
    :func:`bvit_jax.train.optim.grs_schedule` divided by its final value.
    ``g`` must be the loss gradient, so this goes first in the chain.
    """
    if not 0 <= lo <= hi:
        raise ValueError(f"adaptive GRS needs 0 <= lo <= hi, got lo={lo}, hi={hi} (config grs.adaptive_min/max)")
    shape_t = _as_schedule(shape)

    def init_fn(params):
        return AdaptiveGRSState(
            count=jnp.zeros([], jnp.int32), prev_positive=jax.tree.map(lambda w: jnp.asarray(w) >= 0, params)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("grs_adaptive needs the parameters: call tx.update(grads, state, params)")
        s = shape_t(state.count)

        def one(g, w, prev):
            lam = s * adaptive_strength(g, channel_flip_share(w, prev), lo, hi)
            return g + (lam * grs_direction(w)).astype(g.dtype)

        new = jax.tree.map(one, updates, params, state.prev_positive)
        prev = jax.tree.map(lambda w: w >= 0, params)
        return new, AdaptiveGRSState(count=optax.safe_increment(state.count), prev_positive=prev)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def grs_decoupled(
    strength: float | optax.Schedule, learning_rate: float | optax.Schedule, mask: Any = None
) -> optax.GradientTransformation:
    """GRS decoupled from the gradient, applied after the optimizer as AdamW applies its decay, as optax.

        u <- u - lr_t * lambda_t * (|W| - alpha) * sign(W)

    on the final update ``u`` of the latent weights, ``lr_t`` the optimizer's
    learning rate at the same update (pass the same schedule), so ``W + u``
    moves by ``-lr_t * lambda_t`` times the GRS direction whatever Adam's
    second moment is (Loshchilov & Hutter's decoupling, ICLR 2019, applied to
    the GRS term). Place it right after the optimizer. Its ``lambda`` is of
    another order than the coupled one's: there the term is divided by
    ``sqrt(v)`` (about ``|g|``), here it is not.
    """
    if not callable(strength) and strength < 0:
        raise ValueError(f"GRS strength must be >= 0, got {strength} (config field grs.strength)")
    lam_t, lr_t = _as_schedule(strength), _as_schedule(learning_rate)

    def init_fn(params):
        del params
        return GRSState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("grs_decoupled needs the parameters: call tx.update(updates, state, params)")
        step = lr_t(state.count) * lam_t(state.count)
        new = jax.tree.map(lambda u, w: u - (step * grs_direction(w)).astype(u.dtype), updates, params)
        return new, GRSState(count=optax.safe_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


class FreezeState(NamedTuple):
    """State of :func:`freeze_oscillating`, per weight of the masked leaves."""

    flip_freq: Any  # float32 EMA f_t of the sign flips of the latent weight
    frozen: Any  # bool: held fixed from now on


def freeze_oscillating(threshold: float, momentum: float = 0.99, mask: Any = None) -> optax.GradientTransformation:
    """Iterative freezing of oscillating binary weights (Nagel et al., ICML 2022, Sec. 4.2), as optax.

    Per latent weight ``W`` and update ``u_t`` (the final update, so place this
    transform LAST in the chain, after the optimizer):

        flipped_t = 1{sign(W + u_t) != sign(W)}              (sign(0) = +1)
        f_t       = m * f_{t-1} + (1 - m) * flipped_t,  f_0 = 0
        frozen_t  = frozen_{t-1} or f_t > threshold
        u_t      <- 0 where frozen_t

    so a weight that flips at every update has ``f_t = 1 - m^t`` and is frozen
    at the first ``t`` with ``1 - m^t > threshold``; the flip of that update is
    already cancelled, so it keeps the sign it had. From then on its latent
    value, and so its sign, never changes, however large its gradient;
    ``f`` of a frozen weight is no longer updated. ``m`` weights the past
    (``m = 0.99`` is the ``0.01`` momentum of Nagel et al. and of
    :func:`bvit_jax.train.diagnostics.oscillation_update`, which weight the new value).

    The binary analogue of Nagel et al.: they count oscillations (an integer
    change opposite to the previous change) and freeze the weight's integer
    value, in the integer domain so a changing scale cannot re-round it. With
    two levels every flip after a weight's first one is an oscillation, so
    ``f`` here counts every flip (the first one too); freezing the latent float
    freezes the sign, the binary weight's integer value, while the
    per-channel scale ``alpha`` keeps following the channel's other weights.

    Args:
      threshold: ``f`` above which a weight is frozen, in ``[0, 1)``.
      momentum: ``m`` in ``[0, 1)``.
      mask: as in :func:`grs`: the latent binary weights
        (:func:`bvit_jax.nn.param_groups.latent_weight_mask`); ``None``: every leaf.
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"freeze threshold must be in [0, 1), got {threshold} (config field grs.freeze_threshold)")
    if not 0 <= momentum < 1:
        raise ValueError(f"freeze momentum must be in [0, 1), got {momentum} (config field grs.freeze_momentum)")

    def init_fn(params):
        return FreezeState(
            flip_freq=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            frozen=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.bool_), params),
        )

    def flipped(u, w):
        new_w = (w + u).astype(w.dtype)  # what optax.apply_updates will produce
        return (sign(new_w) != sign(w)).astype(jnp.float32)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("freeze_oscillating needs the parameters: call tx.update(updates, state, params)")
        flips = jax.tree.map(flipped, updates, params)
        freq = jax.tree.map(
            lambda f, fr, fl: jnp.where(fr, f, momentum * f + (1 - momentum) * fl), state.flip_freq, state.frozen, flips
        )
        frozen = jax.tree.map(lambda fr, f: fr | (f > threshold), state.frozen, freq)
        updates = jax.tree.map(lambda u, fr: jnp.where(fr, jnp.zeros_like(u), u), updates, frozen)
        return updates, FreezeState(flip_freq=freq, frozen=frozen)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def frozen_share(opt_state: Any) -> jax.Array | None:
    """Share of the weights :func:`freeze_oscillating` has frozen, pooled over its leaves;
    ``None`` when ``opt_state`` holds no freezing state (it is not in the chain)."""
    is_state = lambda x: isinstance(x, FreezeState)
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    if not states:
        return None
    frozen = [x for s in states for x in jax.tree.leaves(s.frozen)]
    if not frozen:
        return jnp.zeros([], jnp.float32)
    return sum(jnp.sum(x, dtype=jnp.float32) for x in frozen) / sum(x.size for x in frozen)
