"""The normalisations: the model's LayerNorm (on the fused kernel of :mod:`bvit_jax.nn.fused_ops`)
and the three normalisations of a binary branch (``model.branch_norm``): LayerNorm, BatchNorm,
per-channel affine.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bvit_jax.nn.folding import branch_norm_affine
from bvit_jax.nn.fused_ops import layer_norm
from bvit_jax.nn.layer_report import LayerReport, float_params_report
from bvit_jax.nn.options import BRANCH_BN_EPSILON, BRANCH_BN_MOMENTUM

__all__ = ["LayerNorm", "BranchLayerNorm", "BranchAffine", "BranchBatchNorm"]


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters, same values) computed by :func:`bvit_jax.nn.fused_ops.layer_norm`.

    Only the default layout takes the fast path: normalisation and features
    on the last axis, scale and bias, fast variance, no mask, no ``axis_name``;
    anything else falls back to flax's implementation.
    """

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if (
            mask is not None
            or self.scale is None
            or self.bias is None
            or self.axis_name is not None
            or not self.use_fast_variance
            or self.reduction_axes not in (-1, (-1,), x.ndim - 1)
            or self.feature_axes not in (-1, (-1,), x.ndim - 1)
        ):
            return super().__call__(x, mask=mask)
        # flax promotes x, scale and bias to the compute dtype first; so does this.
        dtype = self.dtype or jnp.result_type(x, self.scale[...], self.bias[...])
        x, scale, bias = (a.astype(dtype) for a in (x, self.scale[...], self.bias[...]))
        return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))

    def report(self, num_tokens: int) -> LayerReport:
        """Scale and bias, 32-bit, category ``'norm'`` (a LayerNorm the fp DeiT has too); no MACs."""
        return float_params_report(self, "norm")


class BranchLayerNorm(LayerNorm):
    """The LayerNorm on the binary branch of a :class:`LinearBlock` (``branch_norm='layernorm'``).

    The same computation as :class:`LayerNorm`; it reports its parameters as
    added by binarization (the fp DeiT has no such LayerNorm).
    """

    def report(self, num_tokens: int) -> LayerReport:
        """Scale and bias, 32-bit, category ``'added'`` (binarization adds this LayerNorm); no MACs."""
        return float_params_report(self, "added")


class BranchAffine(nnx.Module):
    """Statistics-free branch normalisation: learned per-channel ``y * scale + bias`` (scale 1, bias 0 at init).

    :class:`LinearBlock` with ``branch_norm='affine'`` does not call this
    module on ``y``: it folds ``scale`` and ``bias`` into its linear
    (:func:`fold_branch_affine`), as the packed forward does.
    """

    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, y: jax.Array) -> jax.Array:
        return y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)

    def inference_affine(self) -> tuple[jax.Array, jax.Array]:
        """``(scale, shift)`` of the map ``y * scale + shift`` this layer is at inference: its own parameters."""
        return branch_norm_affine("affine", {"scale": self.scale[...], "bias": self.bias[...]})

    def report(self, num_tokens: int) -> LayerReport:
        """``scale`` / ``bias``: 32-bit, added by binarization (folded away at export); no MACs."""
        return float_params_report(self, "added")


class BranchBatchNorm(nnx.BatchNorm):
    """BatchNorm on the binary branch of a :class:`LinearBlock` (``branch_norm='batchnorm'``).

    Flax's ``nnx.BatchNorm`` over the last axis: while training
    (``use_running_average=False``, :func:`bvit_jax.nn.models.training_view`)
    ``y`` is normalised with the mean and variance of each channel over the
    batch and the tokens, ``(y - mu) / sqrt(var + eps) * scale + bias``, and
    the running averages ``mean``, ``var`` (``nnx.BatchStat``) move by
    momentum ``BRANCH_BN_MOMENTUM``. Under ``jax.jit`` with the batch sharded
    over the data axes of the mesh, the mean over the batch is the mean over
    the global batch: the statistics are synchronised across devices by the
    sharded computation itself, no collective is written here.

    It is built in inference mode (``use_running_average=True``), like every
    other module of this library (``model(images)`` is the eval forward);
    the trainer takes a training view. At inference it is the per-channel
    affine map of :meth:`inference_affine`, which :class:`LinearBlock` and
    export fold into the linear before it.
    """

    def __init__(self, dim: int, *, dtype: Any = None, rngs: nnx.Rngs):
        super().__init__(
            dim,
            use_running_average=True,
            momentum=BRANCH_BN_MOMENTUM,
            epsilon=BRANCH_BN_EPSILON,
            dtype=dtype,
            rngs=rngs,
        )

    def inference_affine(self) -> tuple[jax.Array, jax.Array]:
        """``(scale', shift')`` of the eval-mode map ``y * scale' + shift'`` (:func:`batchnorm_affine`)."""
        values = {"scale": self.scale[...], "bias": self.bias[...], "mean": self.mean[...], "var": self.var[...]}
        return branch_norm_affine("batchnorm", values)

    def report(self, num_tokens: int) -> LayerReport:
        """``scale`` / ``bias``: 32-bit, added by binarization (folded away at export); no MACs.

        The running ``mean`` / ``var`` are statistics, not parameters: they
        fold into the same per-channel scale and bias and are not counted.
        """
        return float_params_report(self, "added")
