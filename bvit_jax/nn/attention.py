"""Multi-head self-attention, optionally binary (Q, K, V in +-1, probabilities in {0, c})."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from bvit_jax.nn.activations import RPReLU, SignActivation
from bvit_jax.nn.binarize import ElasticBinarizer, lsq_grad_scale, positive_level, positive_level_inverse, scale_grad
from bvit_jax.nn.layer_report import LayerReport, ParamReport
from bvit_jax.nn.linear import LinearBlock
from bvit_jax.nn.norms import BranchLayerNorm
from bvit_jax.nn.options import BinaryOptions

__all__ = ["Attention"]


class Attention(nnx.Module):
    """Multi-head self-attention, optionally binary.

    Full precision: ``softmax(Q K^T / sqrt(d)) V``. With ``binary_attention``:
    ``Q_b, K_b, V_b = sign(. - shift)`` (each through a :class:`SignActivation`),
    ``P = softmax(Q_b K_b^T / sqrt(d))``, ``P_b = c * clip(round(P / c), 0, 1)``
    (:func:`bvit_jax.nn.binarize.elastic_binarize`, learnable ``c`` initialised to
    ``1/N`` for N tokens and kept positive as ``c = LEVEL_MIN +
    softplus(attn_level_raw)``, see :meth:`level`; with
    ``attn_level_grad_scale`` its gradient is scaled by LSQ's
    ``1/sqrt(heads * N^2)``), output ``P_b V_b`` (both matmuls on binary operands),
    computed as ``(clip(round(P / c), 0, 1) @ V_b) * c``
    (:func:`bvit_jax.nn.binarize.elastic_matmul`: an exact {0, 1} x +-1 matmul,
    then the level, as the packed forward does).
    q, k, v and the output projection are :class:`LinearBlock` layers.

    Le & Li's additions (CVPRW 2023), each a switch: ``attention_bypass`` makes
    the attention output ``LN(P_b V_b) + q + k + v`` (``q, k, v`` the
    real-valued outputs of the Q, K, V linears, before their signs;
    ``context_norm``), and ``rprelu_everywhere`` passes that output through an
    RPReLU (``context_act``) before the projection, as every block linear's
    output is.
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
        self.context_norm = (
            BranchLayerNorm(dim, epsilon=1e-6, dtype=opts.dtype, rngs=rngs) if opts.attention_bypass else None
        )
        self.context_act = RPReLU(dim) if opts.rprelu_everywhere else None

    def level(self) -> jax.Array | None:
        """The {0, c} level ``c = LEVEL_MIN + softplus(attn_level_raw)`` (> 0), or None without binary attention."""
        if self.attn_level_raw is None:
            return None
        return positive_level(self.attn_level_raw[...])

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        q, k, v = (m(x, capture=capture) for m in (self.q, self.k, self.v))
        real = (q, k, v)  # the real-valued q, k, v before their signs (attention_bypass)
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
        out = rearrange(out, "b h n d -> b n (h d)")
        if self.context_norm is not None:
            out = self.context_norm(out) + real[0] + real[1] + real[2]
        if self.context_act is not None:
            out = self.context_act(out)
        return self.proj(out, capture=capture)

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
