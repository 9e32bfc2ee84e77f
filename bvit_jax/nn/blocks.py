"""The transformer block (pre-norm attention and MLP with residuals) and stochastic depth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bvit_jax.nn.activations import RPReLU
from bvit_jax.nn.attention import Attention
from bvit_jax.nn.linear import LinearBlock
from bvit_jax.nn.norms import LayerNorm
from bvit_jax.nn.options import BinaryOptions

__all__ = ["Mlp", "fold_example_keys", "drop_path", "Block"]


class Mlp(nnx.Module):
    """Transformer MLP: ``fc2(act(fc1(x)))``, act = RPReLU (binary baseline) or GELU (DeiT).

    With ``rprelu_everywhere`` every block linear ends in its own RPReLU, so the
    activation is fc1's (``fc1.out_act``) and the MLP adds none.
    """

    def __init__(self, dim: int, hidden: int, opts: BinaryOptions, *, rngs: nnx.Rngs):
        self.fc1 = LinearBlock(dim, hidden, opts, rngs=rngs)
        self.act = RPReLU(hidden) if opts.rprelu and not opts.rprelu_everywhere else None
        self.gelu = not opts.rprelu
        self.fc2 = LinearBlock(hidden, dim, opts, rngs=rngs)

    def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array:
        h = self.fc1(x, capture=capture)
        if self.act is not None:
            h = self.act(h)
        elif self.gelu:
            h = nnx.gelu(h, approximate=False)
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
