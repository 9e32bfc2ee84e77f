"""The binary linear layer and the block linear around it (shortcut and branch normalisation).

Where the bits are (``docs/method.md``, "Where the bits are"): the inputs and
weights of every linear layer inside the transformer blocks (q, k, v,
attention output, fc1, fc2). With every switch of :class:`BinaryOptions` off
these are exactly ``nnx.Linear``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from bvit_jax.nn.activations import RPReLU, SignActivation
from bvit_jax.nn.binarize import Binarizer, get_kernel_binarizer
from bvit_jax.nn.folding import fold_branch_affine
from bvit_jax.nn.fused_ops import rounded
from bvit_jax.nn.layer_report import LayerReport, ParamReport
from bvit_jax.nn.norms import BranchAffine, BranchBatchNorm, BranchLayerNorm
from bvit_jax.nn.options import BinaryOptions

__all__ = ["BinaryLinear", "match_width", "LinearBlock"]


trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


class BinaryLinear(nnx.Module):
    """Linear layer ``y = B_a(x) @ B_w(W) + b`` on latent float weights.

    ``B_a(x) = sign(x - shift(x))`` when ``binarize_acts`` (else ``x``);
    ``B_w(W) = alpha * sign(W)`` when ``binarize_weights`` (else ``W``), see
    :func:`bvit_jax.nn.binarize.weight_binarize`. The binary product is computed
    as ``y = (B_a(x) @ sign(W)) * alpha + b``
    (:func:`bvit_jax.nn.binarize.binary_matmul`): an exact integer matmul, then
    the scale, the order of operations of the packed layer
    (:mod:`bvit_jax.deploy.packed`), so exported models reproduce these values bit for
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
        self.weight_binarizer = (
            get_kernel_binarizer(opts.kernel_binarizer, opts.weight_scale) if opts.binarize_weights else None
        )
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
        product is the exact integer matmul of :func:`bvit_jax.nn.binarize.binary_matmul`
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

    @property
    def input_binarizer(self) -> Binarizer | None:
        """The binarizer of the input (its :class:`SignActivation`'s), or None with float inputs."""
        return self.act.binarizer if self.act is not None else None

    def latent_weights(self) -> dict[str, Binarizer]:
        """The parameters the forward binarizes, by name, with their binarizer: ``{'kernel': W_b}`` or ``{}``.

        Their float values are *latent*: the model uses only their signs (and
        ``alpha``), so GRS acts on them and weight decay leaves them alone
        (:func:`bvit_jax.nn.param_groups.latent_weight_mask`); export stores
        each in the form its binarizer's ``packing`` names
        (:mod:`bvit_jax.deploy.kernel_formats`).
        """
        return {"kernel": self.weight_binarizer} if self.weight_binarizer is not None else {}

    def report(self, num_tokens: int) -> LayerReport:
        """Kernel at its binarizer's precision (1 bit) or 32 bits, any bias 32 bits; ``num_tokens * in * out`` MACs.

        The MACs are binary when both operands are: the kernel's and the
        input's binarizers both have precision 1. A binary kernel with
        a per-output-channel scale (``packing.scale == 'channel_mean_abs'``:
        ``weight_scale``) adds ``out`` derived 32-bit scales to the export.
        """
        wb, act = self.weight_binarizer, self.input_binarizer
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
            derived_32bit=self.out_features if (wb is not None and wb.packing.scale == "channel_mean_abs") else 0,
        )


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
    ``b = 0``, which the batch mean would remove). With ``opts.rprelu_everywhere``
    the block's output goes through its own :class:`RPReLU` (``out_act``). The last two, at inference
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
        # rprelu_everywhere (Le & Li 2023): an RPReLU on the block's output, ``act(match(x) + N(linear(x)))``.
        self.out_act = RPReLU(out_features) if opts.rprelu_everywhere else None

    def _folded(self) -> bool:
        """Whether the normalisation is an affine map now (affine; a BatchNorm at inference)."""
        if self.branch_norm == "batchnorm":
            return self.norm.use_running_average
        return self.branch_norm == "affine"

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        out = self._block(x, capture)
        return out if self.out_act is None else self.out_act(out)

    def _block(self, x: jax.Array, capture: bool) -> jax.Array:
        """``match(x) + N(linear(x))``, before the optional RPReLU."""
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
