"""What happens to an activation before and after a binary linear: the shifted sign
(:class:`SignActivation`, with RSign's ``beta`` and the ASM term, :class:`ActivationShift`,
:func:`asm_statistic`) and the RPReLU nonlinearity of the binary MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from bvit_jax.nn.binarize import get_activation_binarizer
from bvit_jax.nn.fused_ops import rprelu
from bvit_jax.nn.layer_report import LayerReport, float_params_report
from bvit_jax.nn.options import ASM_MODES, BinaryOptions

__all__ = ["asm_statistic", "ActivationShift", "SignActivation", "RPReLU"]


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

    The packed forward (:mod:`bvit_jax.deploy.packed`) calls this same function, so
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
    diagnostics in :mod:`bvit_jax.train.diagnostics`.
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
