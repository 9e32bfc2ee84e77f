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
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from bvit_jax.binarize import (
    LEVEL_MIN,
    binary_matmul,
    elastic_matmul,
    get_activation_binarizer,
    lsq_grad_scale,
    positive_level,
    positive_level_inverse,
    scale_grad,
    weight_alpha,
)

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
    "fold_branch_affine",
    "rounded",
    "RPReLU",
    "Attention",
    "Mlp",
    "Block",
    "LayerNorm",
    "layer_norm",
    "rprelu",
    "match_width",
]

trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


# ----------------------------------------------------------------------------- fused ops
# Hand-written backward passes for the elementwise layers that a binary ViT has
# many of (a LayerNorm after every block linear, RPReLU in every MLP). The math
# is that of the plain jnp code; autodiff of that code makes XLA (CPU
# especially) materialise full-size broadcasts of per-row statistics and
# per-channel parameters and read the activations more often than needed.


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


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters, same values) computed by :func:`layer_norm`.

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


ASM_MODES = ("token_mean", "per_token", "per_head")
# The normalisation on the output branch of every block linear (with ``linear_shortcut``).
BRANCH_NORMS = ("layernorm", "affine")


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
        computes it at run time); ``'affine'`` a learned per-channel
        ``y * scale + bias`` (:class:`BranchAffine`; no statistics, so export
        folds it into the binary linear's per-channel scale and bias,
        :func:`fold_branch_affine`).
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


class SignActivation(nnx.Module):
    """Binarize an activation: ``x_b = sign(x - shift(x))`` with a surrogate gradient.

    ``heads``: the attention heads the channels belong to (``Q``, ``K``, ``V``
    signs; 1 elsewhere), read only by ``asm_mode='per_head'``.

    With ``capture=True`` it records, as ``nnx.Intermediate`` values, its input
    ``x`` and the shifted value ``x - shift(x)`` (the input of the sign) for the
    diagnostics in :mod:`bvit_jax.diagnostics`.
    """

    def __init__(self, dim: int, opts: BinaryOptions, *, heads: int = 1):
        self.binarizer = opts.act_binarizer
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
        return get_activation_binarizer(self.binarizer)(shifted)


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
    """

    def __init__(self, in_features: int, out_features: int, opts: BinaryOptions, *, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.binarize_weights = opts.binarize_weights
        self.weight_scale = opts.weight_scale
        self.dtype = opts.dtype
        self.kernel = nnx.Param(trunc_normal(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.act = SignActivation(in_features, opts) if opts.binarize_acts else None

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        if self.act is not None:
            x = self.act(x, capture=capture)
        # A 2-D matmul: for (batch, tokens, channels) inputs the weight gradient is then a plain
        # (channels x rows) @ (rows x out) product; contracting batch and tokens as two axes made
        # XLA CPU transpose the output gradient (fused with its producer) before that product.
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        if self.binarize_weights:  # (x @ sign(W)) * alpha: integer matmul, then one multiply
            y = binary_matmul(x2, self.kernel[...], self.weight_scale)
        else:
            y = jnp.dot(x2, self.kernel[...].astype(self.dtype))
        return y.reshape(*lead, self.out_features) + self.bias[...].astype(self.dtype)

    def unscaled(
        self, x: jax.Array, *, capture: bool = False, flat: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """``(B_a(x) @ sign(W), alpha)`` with binary weights, else ``(B_a(x) @ W, None)``; no bias.

        ``__call__`` is ``unscaled * alpha + b``. With binary weights the
        product is the exact integer matmul of :func:`bvit_jax.binarize.binary_matmul`
        (``scale=False``: clipped straight-through to ``W``) and ``alpha =
        mean_in|W|`` (``(out,)``, ones without ``weight_scale``) is detached,
        as ReActNet detaches it, so ``unscaled * alpha`` has the gradients of
        ``__call__``. :class:`LinearBlock` with a statistics-free branch
        normalisation multiplies ``alpha`` into that normalisation's scale.
        ``flat``: the product as the 2-D ``(rows, out)`` matmul output.
        """
        if self.act is not None:
            x = self.act(x, capture=capture)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        if self.binarize_weights:
            y = binary_matmul(x2, self.kernel[...], False)
            if self.weight_scale:
                alpha = jax.lax.stop_gradient(weight_alpha(self.kernel[...]))[0]
            else:
                alpha = jnp.ones((self.out_features,), jnp.float32)
        else:
            y, alpha = jnp.dot(x2, self.kernel[...].astype(self.dtype)), None
        return (y if flat else y.reshape(*lead, self.out_features)), alpha


def rounded(x: jax.Array) -> jax.Array:
    """``x``, unchanged (``where(isnan(x), nan, x)``), but rounded to its dtype where it is computed.

    XLA on CPU contracts a multiply feeding an add into one fused multiply-add
    (one rounding) in some fused kernels and not in others (e.g. where the
    matmul is emitted inside the same loop). ``rounded(a * b) + c`` always
    rounds the product first: the select between the two stops the
    contraction, and no simplifier removes it (it differs from ``x`` for NaN
    payloads). The folded branch normalisation (:func:`fold_branch_affine`,
    :class:`LinearBlock`, and the packed layer) computes every
    ``product + bias`` this way, so both forwards round identically
    wherever XLA places the operations.
    """
    return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), x)


def fold_branch_affine(
    alpha: jax.Array | None, bias: jax.Array, scale: jax.Array, shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Fold a per-channel affine ``z * scale + shift`` into the linear ``z = d * alpha + bias`` before it.

    ``(d * alpha + bias) * scale + shift = d * s' + b'`` with::

        s' = alpha * scale,    b' = bias * scale + shift

    (``alpha = None``: a float linear, ``s' = scale``). Both the model
    (:class:`LinearBlock` with ``branch_norm='affine'``) and export
    (:mod:`bvit_jax.export`) compute ``s'`` and ``b'`` with this function and
    then ``rounded(d * s') + b'``, the packed layer's epilogue, so the two
    forwards perform identical float32 operations (every product rounded
    before its add, :func:`rounded`) and agree bit for bit.
    """
    s = scale if alpha is None else alpha * scale
    return s, rounded(bias * scale) + shift


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


class LinearBlock(nnx.Module):
    """A block linear with the optional real-valued shortcut: ``match(x) + N(linear(x))``.

    Binary-CNN practice applied to every linear of a binary ViT (Bi-Real Net's
    per-layer shortcut, with a normalisation ``N`` on the binary branch), so
    real-valued information bypasses each binarization. ``match`` is
    :func:`match_width`; ``N`` is ``opts.branch_norm``: a LayerNorm
    (``'layernorm'``, parameters ``norm/scale``, ``norm/bias``) or a
    per-channel affine (``'affine'``, :class:`BranchAffine`, same parameter
    names), computed folded into the linear as
    ``d * (alpha * scale) + (b * scale + bias)`` for ``linear(x) = d * alpha + b``
    (:func:`fold_branch_affine`): the packed layer's own arithmetic, so the
    exported model reproduces it bit for bit. Without ``linear_shortcut`` this
    is just the linear layer.
    """

    def __init__(self, in_features: int, out_features: int, opts: BinaryOptions, *, rngs: nnx.Rngs):
        self.linear = BinaryLinear(in_features, out_features, opts, rngs=rngs)
        self.branch_norm = opts.branch_norm if opts.linear_shortcut else None
        if self.branch_norm == "layernorm":
            self.norm = LayerNorm(out_features, epsilon=1e-6, dtype=opts.dtype, rngs=rngs)
        elif self.branch_norm == "affine":
            self.norm = BranchAffine(out_features)
        else:
            self.norm = None

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        if self.branch_norm == "affine":
            d, alpha = self.linear.unscaled(x, capture=capture, flat=True)
            s, b = fold_branch_affine(alpha, self.linear.bias[...], self.norm.scale[...], self.norm.bias[...])
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
        self.num_heads = num_heads
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
        else:
            self.q_sign = self.k_sign = self.v_sign = self.attn_level_raw = None
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
        if self.attn_level_raw is not None:  # elastic_binarize(probs, c) @ v, as (level @ v) * c
            c = self.level()
            if self.level_grad_scale:  # LSQ: g = 1/sqrt(N * Q_P), N = heads * q * k per image, Q_P = 1
                c = scale_grad(c, lsq_grad_scale(math.prod(probs.shape[1:])))
            out = elastic_matmul(probs, c, v)
        else:
            out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"), capture=capture)


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


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (ViT/DeiT)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, num_tokens: int, opts: BinaryOptions, *, rngs: nnx.Rngs
    ):
        self.norm1 = LayerNorm(dim, epsilon=1e-6, dtype=opts.dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, num_tokens, opts, rngs=rngs)
        self.norm2 = LayerNorm(dim, epsilon=1e-6, dtype=opts.dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), opts, rngs=rngs)

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        x = x + self.attn(self.norm1(x), capture=capture)
        return x + self.mlp(self.norm2(x), capture=capture)
