"""Binary ViT building blocks in Flax NNX.

Layers here read their switches from :class:`BinaryOptions`; with every switch
off they are exactly the full-precision DeiT layers, so one implementation
covers the teacher and every binary preset.

Where the bits are (``docs/method.md``, "Where the bits are"): the inputs and weights of every
linear layer inside the transformer blocks (q, k, v, attention output, fc1,
fc2), and both attention matmuls (Q, K, V in +-1; probabilities in {0, c}).
Patch embedding, tokens, LayerNorms, head, biases, scales and shifts stay in
full precision.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from bvit_jax.binarize import (
    LEVEL_MIN,
    ElasticBinarizer,
    WeightBinarizer,
    get_activation_binarizer,
    lsq_grad_scale,
    positive_level,
    positive_level_inverse,
    scale_grad,
)
from bvit_jax.fused_ops import layer_norm, rounded, rprelu
from bvit_jax.layer_report import LayerReport, ParamReport, float_params_report

__all__ = [
    "ASM_MODES",
    "BRANCH_NORMS",
    "BinaryOptions",
    "asm_statistic",
    "ActivationShift",
    "SignActivation",
    "BinaryLinear",
    "LinearBlock",
    "BranchAffine",
    "BranchBatchNorm",
    "BranchLayerNorm",
    "BRANCH_BN_MOMENTUM",
    "BRANCH_BN_EPSILON",
    "batchnorm_affine",
    "branch_norm_affine",
    "fold_branch_affine",
    "RPReLU",
    "Attention",
    "Mlp",
    "Block",
    "drop_path",
    "fold_example_keys",
    "LayerNorm",
    "match_width",
]

trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters, same values) computed by :func:`bvit_jax.fused_ops.layer_norm`.

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


ASM_MODES = ("token_mean", "per_token", "per_head")
# The normalisation on the output branch of every block linear (with ``linear_shortcut``).
BRANCH_NORMS = ("layernorm", "batchnorm", "affine")
# BranchBatchNorm: running averages ``r <- m * r + (1 - m) * batch`` and the variance's epsilon.
BRANCH_BN_MOMENTUM = 0.99
BRANCH_BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class BinaryOptions:
    """The switches of one model; every field is a config field (``model.*``).

    Attributes:
      binarize_weights: latent float kernels -> ``alpha * sign(W)`` in the forward.
      binarize_acts: inputs of binary linears -> ``sign(x - shift)``.
      act_binarizer: backward of the activation sign: ``'approx'`` (Bi-Real
        ApproxSign) or ``'ste'`` (clipped straight-through).
      weight_scale: multiply binary weights by ``alpha = mean|W|`` per output channel.
      learnable_shift: static per-channel ``beta`` before every sign (RSign).
      asm: the adaptive ASM term ``gamma * m(x)`` before every sign, ``m`` set by ``asm_mode``.
      asm_mode: the statistic ``m(x)`` of the ASM term (:func:`asm_statistic`;
        ignored without ``asm``): ``'token_mean'`` (default, the original
        form) the mean over the tokens of the image, per channel;
        ``'per_token'`` each token's own mean over its channels;
        ``'per_head'`` as ``'per_token'`` at the block linears' inputs, and
        each token's mean over the channels of its own attention head at the
        ``Q``, ``K``, ``V`` signs.
      linear_shortcut: ``x + N(binary_linear(x))`` around every block linear,
        ``N`` set by ``branch_norm``.
      branch_norm: the normalisation ``N`` on that branch (ignored without
        ``linear_shortcut``): ``'layernorm'`` (default) a LayerNorm over the
        channels of each token (statistics of the input, so the packed forward
        computes it at run time); ``'batchnorm'`` a BatchNorm
        (:class:`BranchBatchNorm`: statistics per channel over the batch and
        the tokens while training, running averages at eval, so at inference
        it is a per-channel affine map); ``'affine'`` a learned per-channel
        ``y * scale + bias`` (:class:`BranchAffine`, no statistics). Export
        folds both of the last two into the binary linear's per-channel scale
        and bias (:func:`fold_branch_affine`).
      rprelu: RPReLU in the MLP instead of GELU.
      binary_attention: Q, K, V in +-1 and attention probabilities in {0, c}.
      attn_level_init: initial ``c`` of the {0, c} binarizer; ``None`` -> ``1/N``.
        The level is stored as ``attn_level_raw`` with ``c = LEVEL_MIN +
        softplus(attn_level_raw)`` (:func:`bvit_jax.binarize.positive_level`),
        so it stays positive after any optimizer step.
      attn_level_grad_scale: scale the gradient of ``c`` by LSQ's
        ``g = 1/sqrt(N * Q_P)`` (Esser et al., ICLR 2020), ``N = heads * tokens^2``
        (the elements of one image's attention probabilities), ``Q_P = 1``.
        Off by default: under Adam(W) a constant gradient scale of one scalar
        parameter cancels out (up to ``eps`` and global-norm clipping, where it
        lowers ``c``'s share), so it matters mainly for SGD-like optimizers.
      dtype: compute dtype (parameters stay float32).
    """

    binarize_weights: bool = False
    binarize_acts: bool = False
    act_binarizer: str = "approx"
    weight_scale: bool = True
    learnable_shift: bool = False
    asm: bool = False
    asm_mode: str = "token_mean"
    linear_shortcut: bool = False
    branch_norm: str = "layernorm"
    rprelu: bool = False
    binary_attention: bool = False
    attn_level_init: float | None = None
    attn_level_grad_scale: bool = False
    dtype: Any = jnp.float32

    def __post_init__(self):
        get_activation_binarizer(self.act_binarizer)  # validates the name
        if self.asm_mode not in ASM_MODES:
            raise ValueError(f"model.asm_mode={self.asm_mode!r} is not one of {list(ASM_MODES)}")
        if self.branch_norm not in BRANCH_NORMS:
            raise ValueError(
                f"model.branch_norm={self.branch_norm!r} is not one of {list(BRANCH_NORMS)} "
                "(the normalisation on the output branch of every block linear with model.linear_shortcut)"
            )
        if self.attn_level_init is not None and not (LEVEL_MIN < self.attn_level_init < float("inf")):
            raise ValueError(
                f"model.attn_level_init={self.attn_level_init} must be a finite number > {LEVEL_MIN} "
                "(the {0, c} level is positive; None starts at 1/N)"
            )
        if (self.asm or self.learnable_shift) and not (self.binarize_acts or self.binary_attention):
            raise ValueError(
                "model.asm / model.learnable_shift shift the input of a sign, but no "
                "activation is binarized: set model.binarize_acts or model.binary_attention."
            )

    @property
    def is_binary(self) -> bool:
        return self.binarize_weights or self.binarize_acts or self.binary_attention


def asm_statistic(x: jax.Array, mode: str, heads: int = 1) -> jax.Array:
    """The statistic ``m(x)`` that ASM's ``gamma`` multiplies, for ``x`` of shape ``(..., tokens, channels)``.

    * ``'token_mean'``: ``mean_tokens(x)``, shape ``(..., 1, channels)``: each
      channel's mean over the tokens of the same image.
    * ``'per_token'``: ``mean_channels(x)``, shape ``(..., tokens, 1)``: each
      token's own mean over its channels.
    * ``'per_head'``: with ``heads > 1``, each token's mean over the channels of
      its head (channels split as ``(heads, d)``, the attention's layout),
      broadcast back over those ``d`` channels, shape ``x.shape``; with
      ``heads == 1`` (the block linears' inputs) as ``'per_token'``.

    The packed forward (:mod:`bvit_jax.packed`) calls this same function, so
    both forwards shift by identical float32 values. No ``stop_gradient``: the
    gradient flows through the statistic.
    """
    if mode == "token_mean":
        return jnp.mean(x, axis=-2, keepdims=True)
    if mode == "per_head" and heads > 1:
        grouped = rearrange(x, "... (h d) -> ... h d", h=heads)
        m = jnp.broadcast_to(jnp.mean(grouped, axis=-1, keepdims=True), grouped.shape)
        return rearrange(m, "... h d -> ... (h d)")
    if mode in ("per_token", "per_head"):
        return jnp.mean(x, axis=-1, keepdims=True)
    raise ValueError(f"unknown asm_mode {mode!r}; choose one of {list(ASM_MODES)}")


class ActivationShift(nnx.Module):
    """Per-channel shift subtracted before ``sign`` (RSign's beta and the ASM term).

    ``shift(x) = beta + gamma * m(x)`` for ``x`` of shape ``(..., tokens,
    channels)``, ``m`` the statistic of ``mode`` (:func:`asm_statistic`;
    ``'token_mean'``: ``mean_tokens(x)``, the original form); ``beta`` and
    ``gamma`` are learnable per-channel vectors, zero-initialised, so an
    untrained module is plain ``sign``. ``beta`` alone is ReActNet's RSign (Liu
    et al., ECCV 2020); the adaptive ``gamma`` term is this project's
    activation shift module (ASM, ``docs/method.md``, "ASM"). With
    ``'token_mean'`` it removes a learned share of each sample's own channel
    mean, cancelling the large inter-channel offsets of ViT activations; with
    ``'per_token'`` / ``'per_head'`` a learned share of each token's own mean
    (over all its channels, or over those of its attention head), cancelling
    the offsets that differ from token to token.
    """

    def __init__(
        self, dim: int, *, static: bool = True, adaptive: bool = False, mode: str = "token_mean", heads: int = 1
    ):
        if mode not in ASM_MODES:
            raise ValueError(f"unknown asm_mode {mode!r}; choose one of {list(ASM_MODES)}")
        if dim % heads:
            raise ValueError(f"{dim} channels cannot be split into {heads} heads")
        self.beta = nnx.Param(jnp.zeros((dim,))) if static else None
        self.gamma = nnx.Param(jnp.zeros((dim,))) if adaptive else None
        self.mode, self.heads = mode, heads

    def __call__(self, x: jax.Array) -> jax.Array:
        shift = jnp.zeros((x.shape[-1],), x.dtype)
        if self.beta is not None:
            shift = shift + self.beta[...].astype(x.dtype)
        if self.gamma is not None:
            shift = shift + self.gamma[...].astype(x.dtype) * asm_statistic(x, self.mode, self.heads)
        return shift

    def report(self, num_tokens: int) -> LayerReport:
        """``beta`` / ``gamma``: 32-bit, added by binarization; no MACs."""
        return float_params_report(self, "added")


class SignActivation(nnx.Module):
    """Binarize an activation: ``x_b = sign(x - shift(x))`` with a surrogate gradient.

    ``heads``: the attention heads the channels belong to (``Q``, ``K``, ``V``
    signs; 1 elsewhere), read only by ``asm_mode='per_head'``.

    With ``capture=True`` it records, as ``nnx.Intermediate`` values, its input
    ``x`` and the shifted value ``x - shift(x)`` (the input of the sign) for the
    diagnostics in :mod:`bvit_jax.diagnostics`.
    """

    def __init__(self, dim: int, opts: BinaryOptions, *, heads: int = 1):
        self.binarizer = get_activation_binarizer(opts.act_binarizer)
        if opts.learnable_shift or opts.asm:
            self.shift = ActivationShift(
                dim, static=opts.learnable_shift, adaptive=opts.asm, mode=opts.asm_mode, heads=heads
            )
        else:
            self.shift = None

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        shifted = x if self.shift is None else x - self.shift(x)
        if capture:
            self.sow(nnx.Intermediate, "x", x)
            self.sow(nnx.Intermediate, "shifted", shifted)
        return self.binarizer(shifted)


class BinaryLinear(nnx.Module):
    """Linear layer ``y = B_a(x) @ B_w(W) + b`` on latent float weights.

    ``B_a(x) = sign(x - shift(x))`` when ``binarize_acts`` (else ``x``);
    ``B_w(W) = alpha * sign(W)`` when ``binarize_weights`` (else ``W``), see
    :func:`bvit_jax.binarize.weight_binarize`. The binary product is computed
    as ``y = (B_a(x) @ sign(W)) * alpha + b``
    (:func:`bvit_jax.binarize.binary_matmul`): an exact integer matmul, then
    the scale, the order of operations of the packed layer
    (:mod:`bvit_jax.packed`), so exported models reproduce these values bit for
    bit. The kernel stays a float "latent" weight during training: the 1-bit
    model is what ``export`` packs. With both switches off this is exactly
    ``nnx.Linear`` (DeiT's init: truncated normal, std 0.02; zero bias).
    ``use_bias=False`` (before a BatchNorm, which removes any per-channel
    offset): no ``bias`` parameter, ``b = 0``.
    """

    def __init__(
        self, in_features: int, out_features: int, opts: BinaryOptions, *, use_bias: bool = True, rngs: nnx.Rngs
    ):
        self.in_features, self.out_features = in_features, out_features
        self.weight_binarizer = WeightBinarizer(scale=opts.weight_scale) if opts.binarize_weights else None
        self.dtype = opts.dtype
        self.kernel = nnx.Param(trunc_normal(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        self.act = SignActivation(in_features, opts) if opts.binarize_acts else None

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        if self.act is not None:
            x = self.act(x, capture=capture)
        # A 2-D matmul: for (batch, tokens, channels) inputs the weight gradient is then a plain
        # (channels x rows) @ (rows x out) product; contracting batch and tokens as two axes made
        # XLA CPU transpose the output gradient (fused with its producer) before that product.
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        if self.weight_binarizer is not None:  # (x @ sign(W)) * alpha: integer matmul, then one multiply
            y = self.weight_binarizer.matmul(x2, self.kernel[...])
        else:
            y = jnp.dot(x2, self.kernel[...].astype(self.dtype))
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)

    def unscaled(
        self, x: jax.Array, *, capture: bool = False, flat: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """``(B_a(x) @ sign(W), alpha)`` with binary weights, else ``(B_a(x) @ W, None)``; no bias.

        ``__call__`` is ``unscaled * alpha + b``. With binary weights the
        product is the exact integer matmul of :func:`bvit_jax.binarize.binary_matmul`
        (``scale=False``: clipped straight-through to ``W``) and ``alpha =
        mean_in|W|`` (``(out,)``, ones without ``weight_scale``) is detached,
        as ReActNet detaches it, so ``unscaled * alpha`` has the gradients of
        ``__call__``. :class:`LinearBlock` with a foldable branch
        normalisation (affine; a BatchNorm at inference) multiplies ``alpha``
        into that normalisation's scale.
        ``flat``: the product as the 2-D ``(rows, out)`` matmul output.
        """
        if self.act is not None:
            x = self.act(x, capture=capture)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        if self.weight_binarizer is not None:
            y = self.weight_binarizer.unscaled_matmul(x2, self.kernel[...])
            alpha = self.weight_binarizer.alpha(self.kernel[...])
        else:
            y, alpha = jnp.dot(x2, self.kernel[...].astype(self.dtype)), None
        return (y if flat else y.reshape(*lead, self.out_features)), alpha

    def latent_weight_names(self) -> tuple[str, ...]:
        """Names of the parameters the forward binarizes: ``('kernel',)`` with binary weights, else ``()``.

        Their float values are *latent*: the model uses only their signs (and
        ``alpha``), so GRS acts on them and weight decay leaves them alone
        (:func:`bvit_jax.param_groups.latent_weight_mask`).
        """
        return ("kernel",) if self.weight_binarizer is not None else ()

    def report(self, num_tokens: int) -> LayerReport:
        """Kernel at its binarizer's precision (1 bit) or 32 bits, any bias 32 bits; ``num_tokens * in * out`` MACs.

        The MACs are binary when both operands are: the kernel's and the
        input's binarizers both have precision 1. A binary kernel with
        ``weight_scale`` adds ``out`` derived 32-bit scales to the export.
        """
        wb, act = self.weight_binarizer, (self.act.binarizer if self.act is not None else None)
        w_bits = wb.precision if wb is not None else 32
        x_bits = act.precision if act is not None else 32
        macs = num_tokens * self.in_features * self.out_features
        binary = w_bits == 1 and x_bits == 1
        kind = "BinaryLinear" + (" (1-bit W, 1-bit x)" if binary else (" (1-bit W)" if w_bits == 1 else ""))
        params = {"kernel": ParamReport(w_bits, "binary_kernel" if w_bits == 1 else "linear_kernel")}
        if self.bias is not None:
            params["bias"] = ParamReport(32, "bias")
        return LayerReport(
            kind,
            params,
            binary_macs=macs if binary else 0,
            fp_macs=0 if binary else macs,
            derived_32bit=self.out_features if (wb is not None and wb.scale) else 0,
        )


def fold_branch_affine(
    alpha: jax.Array | None, bias: jax.Array | None, scale: jax.Array, shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Fold a per-channel affine ``z * scale + shift`` into the linear ``z = d * alpha + bias`` before it.

    ``(d * alpha + bias) * scale + shift = d * s' + b'`` with::

        s' = alpha * scale,    b' = bias * scale + shift

    (``alpha = None``: a float linear, ``s' = scale``; ``bias = None``: a
    linear without bias, before a BatchNorm, ``b' = shift``). Both the model
    (:class:`LinearBlock` with ``branch_norm='affine'``) and export
    (:mod:`bvit_jax.export`) compute ``s'`` and ``b'`` with this function and
    then ``rounded(d * s') + b'``, the packed layer's epilogue, so the two
    forwards perform identical float32 operations (every product rounded
    before its add, :func:`bvit_jax.fused_ops.rounded`) and agree bit for bit.
    """
    s = scale if alpha is None else alpha * scale
    return s, shift if bias is None else rounded(bias * scale) + shift


def match_width(x: jax.Array, width: int) -> jax.Array:
    """Match the channel width of a shortcut: repeat or average channel groups.

    ``C -> k*C``: concatenate ``k`` copies of ``x`` (``jnp.tile``);
    ``k*C -> C``: average the ``k`` consecutive groups of ``C`` channels
    (Bi-Real / ReActNet-style shortcut for changing widths).
    """
    c = x.shape[-1]
    if c == width:
        return x
    if width % c == 0:
        return jnp.tile(x, (1,) * (x.ndim - 1) + (width // c,))
    if c % width == 0:
        return jnp.mean(rearrange(x, "... (k c) -> ... k c", c=width), axis=-2)
    raise ValueError(f"cannot match a shortcut of width {c} to {width}: one must divide the other")


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
    (``use_running_average=False``, :func:`bvit_jax.models.training_view`)
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


def batchnorm_affine(
    scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array, epsilon: float = BRANCH_BN_EPSILON
) -> tuple[jax.Array, jax.Array]:
    """An eval-mode BatchNorm as the per-channel affine map ``y * s + b``.

    ``(y - mean) / sqrt(var + eps) * scale + bias = y * s + b`` with::

        s = scale * rsqrt(var + eps),    b = bias - mean * s

    (Ioffe & Szegedy, "Batch Normalization", ICML 2015, Alg. 2; the folding
    every BNN inference engine does). ``mean * s`` is rounded before the
    subtraction (:func:`bvit_jax.fused_ops.rounded`), so the model's eval
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
    and export (:mod:`bvit_jax.export`, which holds the variables as a flat
    dict) turn a normalisation into the map they fold.
    """
    if kind == "affine":
        return values["scale"], values["bias"]
    if kind == "batchnorm":
        return batchnorm_affine(values["scale"], values["bias"], values["mean"], values["var"])
    raise ValueError(f"branch normalisation {kind!r} has no inference affine map (foldable: batchnorm, affine)")


class LinearBlock(nnx.Module):
    """A block linear with the optional real-valued shortcut: ``match(x) + N(linear(x))``.

    Binary-CNN practice applied to every linear of a binary ViT (Bi-Real Net's
    per-layer shortcut, with a normalisation ``N`` on the binary branch), so
    real-valued information bypasses each binarization. ``match`` is
    :func:`match_width`; ``N`` is ``opts.branch_norm``: a LayerNorm
    (``'layernorm'``, parameters ``norm/scale``, ``norm/bias``) or a
    per-channel affine (``'affine'``, :class:`BranchAffine`, same parameter
    names) or a BatchNorm (``'batchnorm'``, :class:`BranchBatchNorm`, plus
    the statistics ``norm/mean``, ``norm/var``; the linear then has no bias,
    ``b = 0``, which the batch mean would remove). The last two, at inference
    (a BatchNorm in eval mode is the affine map of its running statistics,
    :func:`batchnorm_affine`), are computed folded into the linear as
    ``d * (alpha * scale) + (b * scale + shift)`` for ``linear(x) = d * alpha + b``
    (:func:`fold_branch_affine`): the packed layer's own arithmetic, so the
    exported model reproduces it bit for bit. A BatchNorm in training mode
    normalises with batch statistics instead (not foldable). Without
    ``linear_shortcut`` this is just the linear layer.
    """

    def __init__(self, in_features: int, out_features: int, opts: BinaryOptions, *, rngs: nnx.Rngs):
        self.branch_norm = opts.branch_norm if opts.linear_shortcut else None
        # Before a BatchNorm a bias is removed by the batch mean: its gradient would be rounding noise.
        use_bias = self.branch_norm != "batchnorm"
        self.linear = BinaryLinear(in_features, out_features, opts, use_bias=use_bias, rngs=rngs)
        if self.branch_norm == "layernorm":
            self.norm = BranchLayerNorm(out_features, epsilon=1e-6, dtype=opts.dtype, rngs=rngs)
        elif self.branch_norm == "batchnorm":
            self.norm = BranchBatchNorm(out_features, dtype=opts.dtype, rngs=rngs)
        elif self.branch_norm == "affine":
            self.norm = BranchAffine(out_features)
        else:
            self.norm = None

    def _folded(self) -> bool:
        """Whether the normalisation is an affine map now (affine; a BatchNorm at inference)."""
        if self.branch_norm == "batchnorm":
            return self.norm.use_running_average
        return self.branch_norm == "affine"

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        if self._folded():
            d, alpha = self.linear.unscaled(x, capture=capture, flat=True)
            bias = self.linear.bias[...] if self.linear.bias is not None else None
            s, b = fold_branch_affine(alpha, bias, *self.norm.inference_affine())
            # the packed epilogue rounded(acc * alpha') + bias': the same float32 operations (docs/method.md)
            y = rounded(d * s.astype(d.dtype)).reshape(*x.shape[:-1], -1) + b.astype(d.dtype)
            return match_width(x, y.shape[-1]).astype(y.dtype) + y
        y = self.linear(x, capture=capture)
        if self.norm is None:
            return y
        return match_width(x, y.shape[-1]).astype(y.dtype) + self.norm(y)


class RPReLU(nnx.Module):
    """RPReLU: ``PReLU(x - gamma) + zeta`` with per-channel ``gamma``, ``zeta`` and slope.

    ``PReLU(z) = z if z >= 0 else a * z``; ``a`` initialised to 0.25, shifts to 0.
    Source: Liu et al., "ReActNet" (ECCV 2020), Eq. 4.
    """

    def __init__(self, dim: int):
        self.gamma = nnx.Param(jnp.zeros((dim,)))
        self.zeta = nnx.Param(jnp.zeros((dim,)))
        # float32, not weak-typed: a weak-typed init made the jitted train step compile again at step 2
        self.slope = nnx.Param(jnp.full((dim,), 0.25, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rprelu(x, *(p[...].astype(x.dtype) for p in (self.gamma, self.zeta, self.slope)))

    def report(self, num_tokens: int) -> LayerReport:
        """``gamma`` / ``zeta`` / ``slope``: 32-bit, added by binarization; no MACs."""
        return float_params_report(self, "added")


class Attention(nnx.Module):
    """Multi-head self-attention, optionally binary.

    Full precision: ``softmax(Q K^T / sqrt(d)) V``. With ``binary_attention``:
    ``Q_b, K_b, V_b = sign(. - shift)`` (each through a :class:`SignActivation`),
    ``P = softmax(Q_b K_b^T / sqrt(d))``, ``P_b = c * clip(round(P / c), 0, 1)``
    (:func:`bvit_jax.binarize.elastic_binarize`, learnable ``c`` initialised to
    ``1/N`` for N tokens and kept positive as ``c = LEVEL_MIN +
    softplus(attn_level_raw)``, see :meth:`level`; with
    ``attn_level_grad_scale`` its gradient is scaled by LSQ's
    ``1/sqrt(heads * N^2)``), output ``P_b V_b`` (both matmuls on binary operands),
    computed as ``(clip(round(P / c), 0, 1) @ V_b) * c``
    (:func:`bvit_jax.binarize.elastic_matmul`: an exact {0, 1} x +-1 matmul,
    then the level, as the packed forward does).
    q, k, v and the output projection are :class:`LinearBlock` layers.
    """

    def __init__(self, dim: int, num_heads: int, num_tokens: int, opts: BinaryOptions, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.q = LinearBlock(dim, dim, opts, rngs=rngs)
        self.k = LinearBlock(dim, dim, opts, rngs=rngs)
        self.v = LinearBlock(dim, dim, opts, rngs=rngs)
        self.proj = LinearBlock(dim, dim, opts, rngs=rngs)
        if opts.binary_attention:
            self.q_sign = SignActivation(dim, opts, heads=num_heads)
            self.k_sign = SignActivation(dim, opts, heads=num_heads)
            self.v_sign = SignActivation(dim, opts, heads=num_heads)
            level = opts.attn_level_init if opts.attn_level_init is not None else 1.0 / num_tokens
            self.attn_level_raw = nnx.Param(jnp.asarray(positive_level_inverse(level), jnp.float32))
            self.prob_binarizer = ElasticBinarizer()
        else:
            self.q_sign = self.k_sign = self.v_sign = self.attn_level_raw = self.prob_binarizer = None
        self.level_grad_scale = bool(opts.attn_level_grad_scale)

    def level(self) -> jax.Array | None:
        """The {0, c} level ``c = LEVEL_MIN + softplus(attn_level_raw)`` (> 0), or None without binary attention."""
        if self.attn_level_raw is None:
            return None
        return positive_level(self.attn_level_raw[...])

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        q, k, v = (m(x, capture=capture) for m in (self.q, self.k, self.v))
        if self.attn_level_raw is not None:
            q = self.q_sign(q, capture=capture)
            k = self.k_sign(k, capture=capture)
            v = self.v_sign(v, capture=capture)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.num_heads) for t in (q, k, v))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        if self.prob_binarizer is not None:  # elastic_binarize(probs, c) @ v, as (level @ v) * c
            c = self.level()
            if self.level_grad_scale:  # LSQ: g = 1/sqrt(N * Q_P), N = heads * q * k per image, Q_P = 1
                c = scale_grad(c, lsq_grad_scale(math.prod(probs.shape[1:])))
            out = self.prob_binarizer.matmul(probs, c, v)
        else:
            out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"), capture=capture)

    def report(self, num_tokens: int) -> LayerReport:
        """The two attention matmuls, ``2 * N^2 * dim`` MACs (``Q K^T`` and ``P V`` over all heads).

        Binary when Q, K, V and the probabilities all are (the sign
        binarizers' and the {0, c} binarizer's precision 1); the level
        ``attn_level_raw`` is a 32-bit parameter added by binarization.
        """
        macs = 2 * num_tokens * num_tokens * self.dim
        signs = (self.q_sign, self.k_sign, self.v_sign)
        binary = self.prob_binarizer is not None and all(s.binarizer.precision == 1 for s in signs)
        params = {"attn_level_raw": ParamReport(32, "added")} if self.attn_level_raw is not None else {}
        return LayerReport(
            "Attention" + (" (binary QK^T, PV)" if binary else " (QK^T, PV)"),
            params,
            binary_macs=macs if binary else 0,
            fp_macs=0 if binary else macs,
            attention_binary_macs=macs if binary else 0,
        )


class Mlp(nnx.Module):
    """Transformer MLP: ``fc2(act(fc1(x)))``, act = RPReLU (binary baseline) or GELU (DeiT)."""

    def __init__(self, dim: int, hidden: int, opts: BinaryOptions, *, rngs: nnx.Rngs):
        self.fc1 = LinearBlock(dim, hidden, opts, rngs=rngs)
        self.act = RPReLU(hidden) if opts.rprelu else None
        self.fc2 = LinearBlock(hidden, dim, opts, rngs=rngs)

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        h = self.fc1(x, capture=capture)
        h = self.act(h) if self.act is not None else nnx.gelu(h, approximate=False)
        return self.fc2(h, capture=capture)


def fold_example_keys(keys: jax.Array, data: int) -> jax.Array:
    """``fold_in(keys[b], data)`` for each key of a batch of per-example keys (shape ``(B,)``)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def drop_path(x: jax.Array, rate: float, keys: jax.Array | None) -> jax.Array:
    """Stochastic depth on a residual branch, per example (Huang et al., "Deep Networks with
    Stochastic Depth", ECCV 2016; the per-sample ``DropPath`` of timm that DeiT trains with).

        y_b = x_b * m_b / (1 - rate),    m_b ~ Bernoulli(1 - rate),  one draw per example b

    computed as ``x_b * (m_b ? fl(1 / (1 - rate)) : 0)``; the 1/(1 - rate) keeps the expectation,
    ``E[y] = x``, so eval (no drop) sees the branch at its trained scale. ``m_b`` is
    ``bernoulli(keys[b], 1 - rate)``: each example's draw depends on its own key only, not on the
    batch it is in nor on how the batch is sharded or split into micro-batches. ``keys=None``
    or ``rate=0`` returns ``x`` itself (the deterministic forward of eval, diagnostics and export).
    """
    if keys is None or rate == 0:
        return x
    if not 0 <= rate < 1:
        raise ValueError(f"drop path rate must be in [0, 1), got {rate} (config field model.drop_path_rate)")
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate))(keys)
    scale = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)
    return x * scale.reshape(scale.shape + (1,) * (x.ndim - 1))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (ViT/DeiT).

    With ``drop_path_rate = r > 0`` and per-example keys ``keys`` (shape ``(B,)``), each residual
    branch is dropped per example (:func:`drop_path`): ``x + D_1(Attn(LN(x)))`` then
    ``x + D_2(MLP(LN(x)))``, ``D_i`` drawing from ``fold_in(keys[b], i - 1)``. Without keys the
    block is deterministic, whatever ``r``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        num_tokens: int,
        opts: BinaryOptions,
        *,
        rngs: nnx.Rngs,
        drop_path_rate: float = 0.0,
    ):
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop path rate must be in [0, 1), got {drop_path_rate} (model.drop_path_rate)")
        self.drop_path_rate = float(drop_path_rate)
        self.norm1 = LayerNorm(dim, epsilon=1e-6, dtype=opts.dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, num_tokens, opts, rngs=rngs)
        self.norm2 = LayerNorm(dim, epsilon=1e-6, dtype=opts.dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), opts, rngs=rngs)

    def __call__(self, x: jax.Array, *, capture: bool = False, keys: jax.Array | None = None) -> jax.Array:
        r = self.drop_path_rate
        if keys is None or r == 0:
            x = x + self.attn(self.norm1(x), capture=capture)
            return x + self.mlp(self.norm2(x), capture=capture)
        x = x + drop_path(self.attn(self.norm1(x), capture=capture), r, fold_example_keys(keys, 0))
        return x + drop_path(self.mlp(self.norm2(x), capture=capture), r, fold_example_keys(keys, 1))
