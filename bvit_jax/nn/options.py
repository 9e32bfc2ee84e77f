"""The switches of a model: :class:`BinaryOptions`, one frozen record of every ``model.overrides.*`` field
that decides where the bits are, and the names each switch may take.

Every layer of :mod:`bvit_jax.nn` reads its switches from here; with every
switch off the layers are exactly the full-precision DeiT layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from bvit_jax.nn.binarize import LEVEL_MIN, get_activation_binarizer, get_kernel_binarizer

__all__ = ["ASM_MODES", "BRANCH_NORMS", "BRANCH_BN_MOMENTUM", "BRANCH_BN_EPSILON", "BinaryOptions"]


ASM_MODES = ("token_mean", "per_token", "per_head")
# The normalisation on the output branch of every block linear (with ``linear_shortcut``).
BRANCH_NORMS = ("layernorm", "batchnorm", "affine")
# BranchBatchNorm: running averages ``r <- m * r + (1 - m) * batch`` and the variance's epsilon.
BRANCH_BN_MOMENTUM = 0.99
BRANCH_BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class BinaryOptions:
    """The switches of one model; every field is a config field (``model.overrides.*``).

    Attributes:
      binarize_weights: latent float kernels -> ``alpha * sign(W)`` in the forward.
      binarize_acts: inputs of binary linears -> ``sign(x - shift)``.
      act_binarizer: backward of the activation sign: ``'approx'`` (Bi-Real
        ApproxSign) or ``'ste'`` (clipped straight-through).
      kernel_binarizer: the binarizer of the latent kernels (a name of
        :data:`bvit_jax.nn.binarize.KERNEL_BINARIZERS`): ``'weight'``
        (``alpha * sign(W)``, clipped straight-through gradient) or one added
        with :func:`bvit_jax.nn.binarize.register_kernel_binarizer`.
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
      rprelu_everywhere: an RPReLU after every block linear (Q, K, V, the
        attention projection, fc1, fc2) and after the attention output, not
        only in the MLP: Le & Li's W1A1 DeiT (CVPRW 2023), which follows every
        binary operation of a block with one (needs ``rprelu``; fc1's is the
        MLP's activation).
      attention_bypass: a real-valued bypass around the binary attention
        (Le & Li 2023): the attention output is ``LN(P_b V_b) + q + k + v``,
        with ``q, k, v`` the real-valued outputs of the Q, K, V linears before
        their signs (after their RPReLU with ``rprelu_everywhere``), so the
        projection sees real information that the +-1 attention dropped.
        Needs ``binary_attention``; the matmuls stay binary.
      binary_attention: Q, K, V in +-1 and attention probabilities in {0, c}.
      attn_level_init: initial ``c`` of the {0, c} binarizer; ``None`` -> ``1/N``.
        The level is stored as ``attn_level_raw`` with ``c = LEVEL_MIN +
        softplus(attn_level_raw)`` (:func:`bvit_jax.nn.binarize.positive_level`),
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
    kernel_binarizer: str = "weight"
    weight_scale: bool = True
    learnable_shift: bool = False
    asm: bool = False
    asm_mode: str = "token_mean"
    linear_shortcut: bool = False
    branch_norm: str = "layernorm"
    rprelu: bool = False
    rprelu_everywhere: bool = False
    attention_bypass: bool = False
    binary_attention: bool = False
    attn_level_init: float | None = None
    attn_level_grad_scale: bool = False
    dtype: Any = jnp.float32

    def __post_init__(self):
        get_activation_binarizer(self.act_binarizer)  # validates the names
        get_kernel_binarizer(self.kernel_binarizer)
        if self.asm_mode not in ASM_MODES:
            raise ValueError(f"model.overrides.asm_mode={self.asm_mode!r} is not one of {list(ASM_MODES)}")
        if self.branch_norm not in BRANCH_NORMS:
            raise ValueError(
                f"model.overrides.branch_norm={self.branch_norm!r} is not one of {list(BRANCH_NORMS)} "
                "(the normalisation on the output branch of every block linear with model.overrides.linear_shortcut)"
            )
        if self.attn_level_init is not None and not (LEVEL_MIN < self.attn_level_init < float("inf")):
            raise ValueError(
                f"model.overrides.attn_level_init={self.attn_level_init} must be a finite number > {LEVEL_MIN} "
                "(the {0, c} level is positive; None starts at 1/N)"
            )
        if (self.asm or self.learnable_shift) and not (self.binarize_acts or self.binary_attention):
            raise ValueError(
                "model.overrides.asm / model.overrides.learnable_shift shift the input of a sign, but no "
                "activation is binarized: set model.overrides.binarize_acts or model.overrides.binary_attention."
            )

        if self.rprelu_everywhere and not self.rprelu:
            raise ValueError(
                "model.overrides.rprelu_everywhere adds an RPReLU after every block linear, the MLP's included: "
                "set model.overrides.rprelu=True with it (the MLP's activation is then fc1's RPReLU, not GELU)"
            )
        if self.attention_bypass and not self.binary_attention:
            raise ValueError(
                "model.overrides.attention_bypass adds the real-valued q, k, v around the binary attention: "
                "it needs model.overrides.binary_attention=True (without it the attention is real-valued already)"
            )

    @property
    def is_binary(self) -> bool:
        return self.binarize_weights or self.binarize_acts or self.binary_attention
