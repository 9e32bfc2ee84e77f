"""Fused elementwise ops with hand-written backward passes: LayerNorm, RPReLU, and a rounding barrier.

A binary ViT has many elementwise layers (a LayerNorm after every block
linear, RPReLU in every MLP). The math here is that of the plain ``jnp``
code; autodiff of that code makes XLA (on CPU especially) materialise
full-size broadcasts of per-row statistics and per-channel parameters and read
the activations more often than needed, so each op's backward is written in
closed form. The layers (:mod:`bvit_jax.nn`) and the packed 1-bit forward
(:mod:`bvit_jax.deploy.packed`) call the same functions, so both compute identical
float32 values.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["layer_norm", "rprelu", "rounded"]


def _row_mean(a: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """``mean(a * w, axis=-1, keepdims=True)`` (``w`` per channel, default 1).

    On CPU this is a matrix-vector product: XLA's CPU reductions of
    elementwise expressions with per-channel operands materialise those
    operands broadcast to the full activation shape, a dot does not. Elsewhere
    it is the plain reduction.
    """

    def by_dot(a, w):
        v = jnp.full(a.shape[-1:], 1.0 / a.shape[-1], a.dtype) if w is None else w.astype(a.dtype) / a.shape[-1]
        return jnp.einsum("...d,d->...", a, v, precision=jax.lax.Precision.HIGHEST)[..., None]

    def by_reduce(a, w):
        return jnp.mean(a if w is None else a * w, axis=-1, keepdims=True)

    return jax.lax.platform_dependent(a, w, cpu=by_dot, default=by_reduce)


def _ln_stats(x: jax.Array, epsilon: float):
    """float32 (or wider) ``x``, its per-row mean and ``1/sqrt(var + eps)``, var = E[x^2] - E[x]^2 >= 0."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = _row_mean(xf)
    var = jnp.maximum(0.0, _row_mean(xf * xf) - mean * mean)
    return xf, mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float = 1e-6, dtype: Any = None) -> jax.Array:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Statistics and arithmetic in float32 (at least), result in ``dtype``
    (default ``x.dtype``); the variance is ``E[x^2] - E[x]^2`` clipped at 0,
    as in ``flax.nnx.LayerNorm`` (``use_fast_variance=True``), whose values
    this matches up to float rounding. The backward is the closed form
    (``xhat`` the normalised input, ``g`` the output gradient, ``r = 1/sqrt(var + eps)``)::

        d scale = sum_rows g * xhat,    d bias = sum_rows g
        d x     = r * (g*scale - mean(g*scale) - xhat * mean(g*scale * xhat))   (means over the last axis)

    saving only ``x`` and two numbers per row.
    """
    return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
    xf, mean, rstd = _ln_stats(x, epsilon)
    y = ((xf - mean) * rstd) * scale + bias
    return y.astype(dtype or x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(epsilon, dtype, res, g):
    x, mean, rstd, scale = res
    xhat = (x.astype(mean.dtype) - mean) * rstd
    g = g.astype(mean.dtype)
    rows = tuple(range(x.ndim - 1))
    d_scale = jnp.sum(g * xhat, axis=rows)
    d_bias = jnp.sum(g, axis=rows)
    dx = rstd * (g * scale - _row_mean(g, scale) - xhat * _row_mean(g * xhat, scale))
    dx = dx.astype(x.dtype)
    return dx, d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def rprelu(x: jax.Array, gamma: jax.Array, zeta: jax.Array, slope: jax.Array) -> jax.Array:
    """``z = x - gamma``; ``where(z >= 0, z, slope * z) + zeta`` (per-channel ``gamma``, ``zeta``, ``slope``).

    Backward (closed form, one pass over the activations)::

        d x = g * where(z >= 0, 1, slope),  d gamma = -sum_rows d x,
        d zeta = sum_rows g,                d slope = sum_rows g * where(z >= 0, 0, z)
    """
    z = x - gamma
    return jnp.where(z >= 0, z, slope * z) + zeta


def _rprelu_fwd(x, gamma, zeta, slope):
    return rprelu(x, gamma, zeta, slope), (x, gamma, slope)


def _rprelu_bwd(res, g):
    x, gamma, slope = res
    z = x - gamma
    neg = z < 0
    dx = jnp.where(neg, slope * g, g)
    rows = tuple(range(x.ndim - 1))
    return dx, -jnp.sum(dx, axis=rows), jnp.sum(g, axis=rows), jnp.sum(jnp.where(neg, g * z, 0), axis=rows)


rprelu.defvjp(_rprelu_fwd, _rprelu_bwd)


def rounded(x: jax.Array) -> jax.Array:
    """``x``, unchanged (``where(isnan(x), nan, x)``), but rounded to its dtype where it is computed.

    XLA on CPU contracts a multiply feeding an add into one fused multiply-add
    (one rounding) in some fused kernels and not in others (e.g. where the
    matmul is emitted inside the same loop). ``rounded(a * b) + c`` always
    rounds the product first: the select between the two stops the
    contraction, and no simplifier removes it (it differs from ``x`` for NaN
    payloads). The folded branch normalisation (:func:`bvit_jax.nn.folding.fold_branch_affine`,
    :class:`bvit_jax.nn.linear.LinearBlock`, and the packed layer) computes every
    ``product + bias`` this way, so both forwards round identically
    wherever XLA places the operations.
    """
    return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), x)
