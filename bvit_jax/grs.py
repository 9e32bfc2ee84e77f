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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bvit_jax.binarize import sign

__all__ = ["grs", "grs_penalty", "grs_direction", "GRSState"]


class GRSState(NamedTuple):
    count: jax.Array  # number of updates so far (drives a lambda schedule)


def _alpha(w: jax.Array) -> jax.Array:
    """``mean(|W|)`` over every axis but the last (the output channels), keepdims."""
    return jnp.mean(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True)


def grs_direction(w: jax.Array) -> jax.Array:
    """``(|W| - alpha) * sign(W)`` with ``sign(0) = +1``: the GRS gradient per unit lambda."""
    return (jnp.abs(w) - _alpha(w)) * sign(w)


def grs_penalty(w: jax.Array) -> jax.Array:
    """``1/2 * sum (|W| - alpha)^2``: the penalty whose gradient GRS adds."""
    return 0.5 * jnp.sum((jnp.abs(w) - _alpha(w)) ** 2)


def grs(strength: float | optax.Schedule, mask: Any = None) -> optax.GradientTransformation:
    """GRS as an ``optax.GradientTransformation``.

    ``update(g, state, params)`` returns ``g + lambda_t * (|W| - alpha) * sign(W)``
    on the leaves selected by ``mask`` and ``g`` on every other leaf.

    Args:
      strength: ``lambda`` (>= 0), or a schedule ``step -> lambda`` (e.g.
        ``optax.linear_schedule(0, 1e-4, 1000)`` to warm it up).
      mask: a boolean pytree like the params (see
        :func:`bvit_jax.param_groups.latent_weight_mask`) or a callable
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
