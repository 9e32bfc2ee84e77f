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
or a linear / cosine ramp-up from 0). The comparison point of Nagel et al.
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

__all__ = ["grs", "grs_penalty", "grs_direction", "GRSState", "freeze_oscillating", "FreezeState", "frozen_share"]


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
    schedule = strength if callable(strength) else (lambda _: strength)

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
