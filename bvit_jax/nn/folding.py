"""The folding math: a branch normalisation at inference as a per-channel affine map, and that map
folded into the binary linear before it (``d * s' + b'``).

The model (:class:`bvit_jax.nn.linear.LinearBlock`) and export
(:mod:`bvit_jax.deploy.export`) both compute the folded scale and bias with
these functions, so the two forwards perform the same float32 operations.
"""

from __future__ import annotations

import jax

from bvit_jax.nn.fused_ops import rounded
from bvit_jax.nn.options import BRANCH_BN_EPSILON

__all__ = ["batchnorm_affine", "branch_norm_affine", "fold_branch_affine"]


def batchnorm_affine(
    scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array, epsilon: float = BRANCH_BN_EPSILON
) -> tuple[jax.Array, jax.Array]:
    """An eval-mode BatchNorm as the per-channel affine map ``y * s + b``.

    ``(y - mean) / sqrt(var + eps) * scale + bias = y * s + b`` with::

        s = scale * rsqrt(var + eps),    b = bias - mean * s

    (Ioffe & Szegedy, "Batch Normalization", ICML 2015, Alg. 2; the folding
    every BNN inference engine does). ``mean * s`` is rounded before the
    subtraction (:func:`bvit_jax.nn.fused_ops.rounded`), so the model's eval
    forward and export, which both compute ``b`` here, get the same bits
    whether or not the compiler would contract it into an FMA. ``rsqrt`` is
    the one op both use (a ``scale / sqrt(...)`` could be rewritten to it by
    XLA inside the model's graph and not in export's op-by-op calls); its
    last bit is the backend's, so the bit-for-bit equality holds for an
    export and an eval forward on the same backend (CPU: measured).
    """
    s = scale * jax.lax.rsqrt(var + epsilon)
    return s, bias - rounded(mean * s)


def branch_norm_affine(kind: str, values) -> tuple[jax.Array, jax.Array]:
    """``(scale, shift)`` of a foldable branch normalisation at inference, from its variables by name.

    ``kind='affine'``: ``(values['scale'], values['bias'])``;
    ``kind='batchnorm'``: :func:`batchnorm_affine` of ``scale``, ``bias``,
    ``mean``, ``var``. The one place both the model (:class:`LinearBlock`)
    and export (:mod:`bvit_jax.deploy.export`, which holds the variables as a flat
    dict) turn a normalisation into the map they fold.
    """
    if kind == "affine":
        return values["scale"], values["bias"]
    if kind == "batchnorm":
        return batchnorm_affine(values["scale"], values["bias"], values["mean"], values["var"])
    raise ValueError(f"branch normalisation {kind!r} has no inference affine map (foldable: batchnorm, affine)")


def fold_branch_affine(
    alpha: jax.Array | None, bias: jax.Array | None, scale: jax.Array, shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Fold a per-channel affine ``z * scale + shift`` into the linear ``z = d * alpha + bias`` before it.

    ``(d * alpha + bias) * scale + shift = d * s' + b'`` with::

        s' = alpha * scale,    b' = bias * scale + shift

    (``alpha = None``: a float linear, ``s' = scale``; ``bias = None``: a
    linear without bias, before a BatchNorm, ``b' = shift``). Both the model
    (:class:`LinearBlock` with ``branch_norm='affine'``) and export
    (:mod:`bvit_jax.deploy.export`) compute ``s'`` and ``b'`` with this function and
    then ``rounded(d * s') + b'``, the packed layer's epilogue, so the two
    forwards perform identical float32 operations (every product rounded
    before its add, :func:`bvit_jax.nn.fused_ops.rounded`) and agree bit for bit.
    """
    s = scale if alpha is None else alpha * scale
    return s, shift if bias is None else rounded(bias * scale) + shift
