"""Layers: ASM (every ``asm_mode``)/RSign, BinaryLinear against explicit +-1 arithmetic, match_width, RPReLU,
the hand-written backward passes against autodiff, the attention level.

Float comparisons use bounds derived from float32 arithmetic (see
``gamma_n`` below), so they hold on any CPU whatever order XLA sums in.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bvit_jax.nn.activations import RPReLU, SignActivation, asm_statistic
from bvit_jax.nn.attention import Attention
from bvit_jax.nn.binarize import LEVEL_MIN, lsq_grad_scale
from bvit_jax.nn.linear import BinaryLinear, LinearBlock, match_width
from bvit_jax.nn.models import training_view
from bvit_jax.nn.norms import BranchAffine, BranchBatchNorm, LayerNorm
from bvit_jax.nn.options import ASM_MODES, BRANCH_BN_EPSILON, BRANCH_BN_MOMENTUM, BRANCH_NORMS, BinaryOptions
from bvit_jax.nn.param_groups import flatten_with_paths
from bvit_jax.train import diagnostics
from tests.tolerances import U32, assert_within, gamma_n

BIN = BinaryOptions(binarize_weights=True, binarize_acts=True, learnable_shift=True)
ASM = dataclasses.replace(BIN, asm=True)


def _pm1(a):
    return np.where(np.asarray(a) >= 0, 1.0, -1.0)


@pytest.mark.parametrize("mode", ASM_MODES)
def test_untrained_asm_is_plain_sign(mode):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6)) + jnp.arange(6.0) * 3
    x = x.at[0, 0, 0].set(0.0)  # sign(0) = +1
    act = SignActivation(6, dataclasses.replace(ASM, asm_mode=mode), heads=2)
    assert act.shift.beta is not None and act.shift.gamma is not None and act.shift.mode == mode
    np.testing.assert_array_equal(act(x), _pm1(x))
    np.testing.assert_array_equal(SignActivation(6, BIN)(x), _pm1(x))


def test_shift_formula():
    x = jax.random.normal(jax.random.key(1), (3, 6, 4))
    act = SignActivation(4, ASM)
    beta = jnp.array([0.5, -0.5, 0.0, 1.0])
    gamma = jnp.array([0.0, 1.0, 0.5, -1.0])
    act.shift.beta[...] = beta
    act.shift.gamma[...] = gamma
    shift = beta + gamma * x.mean(axis=1, keepdims=True)
    np.testing.assert_array_equal(act(x), _pm1(x - shift))


def _asm_reference(x, beta, gamma, mode, heads):
    """float64 ``x - (beta + gamma * m(x))`` and ``m(x)`` (broadcast to ``x``'s shape) for each ASM mode."""
    x = np.asarray(x, np.float64)
    if mode == "token_mean":
        m = x.mean(axis=-2, keepdims=True)
    elif mode == "per_token" or heads == 1:
        m = x.mean(axis=-1, keepdims=True)
    else:  # per_head: each token's mean over the channels of its head
        g = x.reshape(x.shape[:-1] + (heads, -1))
        m = np.broadcast_to(g.mean(axis=-1, keepdims=True), g.shape).reshape(x.shape)
    m = np.broadcast_to(m, x.shape)
    beta, gamma = np.asarray(beta, np.float64), np.asarray(gamma, np.float64)
    return x - (beta + gamma * m), m


@pytest.mark.parametrize("mode, heads", [("token_mean", 1), ("per_token", 1), ("per_head", 3), ("per_head", 1)])
def test_asm_mode_forward_equals_numpy_formula(mode, heads):
    """``sign(x - (beta + gamma * m(x)))`` for every ``asm_mode`` against float64 numpy.

    float32 bound: the mean of ``n`` values (``n`` tokens or channels) is within
    ``gamma_n(n + 1) * mean|x|`` (a sum of ``n`` terms, one division); then one
    product, one sum and one difference: ``gamma_n(3)`` of their magnitudes.
    """
    c, tokens = 12, 10
    kx, kb, kg, ko = jax.random.split(jax.random.key(11), 4)
    # per-token offsets (what the per-token forms are for) on top of per-channel ones
    x = jax.random.normal(kx, (3, tokens, c)) + 3 * jax.random.normal(ko, (3, tokens, 1)) + jnp.linspace(-2, 2, c)
    beta, gamma = 0.3 * jax.random.normal(kb, (c,)), jax.random.uniform(kg, (c,), minval=-1.5, maxval=1.5)
    act = SignActivation(c, dataclasses.replace(ASM, asm_mode=mode), heads=heads)
    act.shift.beta[...] = beta
    act.shift.gamma[...] = gamma
    y, inter = nnx.capture(act, nnx.Intermediate)(x, capture=True)
    flat = {str(k[-1]): (v.get_value() if hasattr(v, "get_value") else v)[0] for k, v in nnx.to_flat_state(inter)}
    shifted = np.asarray(flat["shifted"])
    np.testing.assert_array_equal(y, _pm1(shifted))  # the sign of exactly the captured value
    ref, m = _asm_reference(x, beta, gamma, mode, heads)
    n = tokens if mode == "token_mean" else c // heads
    span = np.abs(x).mean(axis=-2, keepdims=True) if mode == "token_mean" else None
    if span is None:
        ax = np.abs(np.asarray(x, np.float64))
        span = ax.reshape(ax.shape[:-1] + (c // n, n)).mean(-1, keepdims=True)
        span = np.broadcast_to(span, span.shape[:-1] + (n,)).reshape(ax.shape)
    g64, b64 = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    bound = np.abs(g64) * gamma_n(n + 1) * span + gamma_n(3) * (np.abs(x) + np.abs(b64) + np.abs(g64 * m))
    assert_within(shifted, ref, bound, f"x - shift ({mode})")
    clear = np.abs(ref) > bound  # where rounding cannot reach 0, the signs agree
    np.testing.assert_array_equal(np.asarray(y)[clear], _pm1(ref)[clear])
    if mode != "token_mean":  # a different form from today's: its signs differ somewhere
        other, _ = _asm_reference(x, beta, gamma, "token_mean", 1)
        assert np.any(_pm1(other) != _pm1(ref))


@pytest.mark.parametrize("mode", ASM_MODES)
def test_asm_mode_gradients_reach_beta_and_gamma(mode):
    """``d/d beta_c = -sum g_c`` and ``d/d gamma_c = -sum g_c * m_c`` (``g`` the surrogate gradient at
    the sign input, sums over images and tokens): finite, non-zero, and equal to those sums."""
    from bvit_jax.nn.binarize import get_activation_binarizer

    c, heads = 8, 2
    kx, kw, kb, kg = jax.random.split(jax.random.key(12), 4)
    x = 0.7 * jax.random.normal(kx, (2, 9, c)) + 0.5 * jax.random.normal(kb, (2, 9, 1))
    up = jax.random.normal(kw, (2, 9, c))
    act = SignActivation(c, dataclasses.replace(ASM, asm_mode=mode), heads=heads)
    act.shift.beta[...] = 0.1 * jax.random.normal(kb, (c,))
    act.shift.gamma[...] = 0.5 * jax.random.normal(kg, (c,))
    grads = nnx.grad(lambda m: jnp.sum(up * m(x)))(act)
    gb, gg = np.asarray(grads["shift"]["beta"][...]), np.asarray(grads["shift"]["gamma"][...])
    assert np.all(np.isfinite(gb)) and np.all(np.isfinite(gg))
    assert np.all(gb != 0) and np.all(gg != 0)
    # closed form from the surrogate gradient at the captured sign input
    _, inter = nnx.capture(act, nnx.Intermediate)(x, capture=True)
    flat = {str(k[-1]): (v.get_value() if hasattr(v, "get_value") else v)[0] for k, v in nnx.to_flat_state(inter)}
    _, vjp = jax.vjp(get_activation_binarizer(ASM.act_binarizer), flat["shifted"])
    g = np.asarray(vjp(up)[0], np.float64)
    m = np.broadcast_to(np.asarray(asm_statistic(x, mode, heads), np.float64), x.shape)
    rows = (0, 1)
    n = x.shape[0] * x.shape[1]
    assert_within(gb, -np.sum(g, rows), gamma_n(n) * np.sum(np.abs(g), rows), "d beta")
    assert_within(gg, -np.sum(g * m, rows), gamma_n(n + 1) * np.sum(np.abs(g * m), rows), "d gamma")


def test_asm_mode_is_validated():
    with pytest.raises(ValueError, match="asm_mode"):
        dataclasses.replace(ASM, asm_mode="per_channel")
    assert BinaryOptions().asm_mode == "token_mean"  # today's form stays the default
    assert ASM_MODES[0] == "token_mean"


def _captured_stats(act, x):
    y, inter = nnx.capture(act, nnx.Intermediate)(x, capture=True)
    flat = {str(k[-1]): (v.get_value() if hasattr(v, "get_value") else v)[0] for k, v in nnx.to_flat_state(inter)}
    np.testing.assert_array_equal(y, _pm1(flat["shifted"]))
    return diagnostics.activation_metrics({"act": flat}), flat


def test_asm_gamma_one_balances_channels_with_large_offsets():
    c = 8
    offsets = jnp.linspace(-6.0, 6.0, c)  # large per-channel offsets, per-sample noise smaller
    x = jax.random.normal(jax.random.key(2), (4, 50, c)) + offsets
    act = SignActivation(c, ASM)
    before, _ = _captured_stats(act, x)
    act.shift.gamma[...] = jnp.ones((c,))
    after, flat = _captured_stats(act, x)

    p_before = np.mean(_pm1(x) > 0, axis=(0, 1))
    p_after = np.mean(np.asarray(flat["shifted"]) >= 0, axis=(0, 1))
    # every channel's share of +1 moves towards 0.5
    assert np.all(np.abs(p_after - 0.5) <= np.abs(p_before - 0.5) + 1e-9)
    assert np.max(np.abs(p_after - 0.5)) < 0.15
    assert np.max(np.abs(p_before - 0.5)) > 0.45  # saturated channels before
    assert float(after["act_entropy/act"]) > float(before["act_entropy/act"]) + 0.3
    assert float(after["act_entropy/act"]) > 0.95
    assert float(after["act_entropy/act"]) <= 1.0


def test_per_token_asm_balances_tokens_with_large_offsets():
    """Tokens with large offsets of their own: each token's bits are nearly constant (low *token*
    entropy) while every channel is still +1 about half the time (high *channel* entropy). The
    'token_mean' form cannot remove such offsets; 'per_token' at gamma = 1 does."""
    c, tokens = 32, 64
    offsets = jnp.linspace(-6.0, 6.0, tokens)[:, None]  # one offset per token, the same in every image
    x = jax.random.normal(jax.random.key(13), (4, tokens, c)) + offsets
    stats = {}
    for mode in ("token_mean", "per_token"):
        act = SignActivation(c, dataclasses.replace(ASM, asm_mode=mode))
        before, _ = _captured_stats(act, x)
        act.shift.gamma[...] = jnp.ones((c,))
        stats[mode], _ = _captured_stats(act, x)
    assert float(before["act_entropy/act"]) > 0.95  # channels look balanced already
    assert float(before["act_token_entropy/act"]) < 0.5  # but most tokens are constant
    assert float(stats["token_mean"]["act_token_entropy/act"]) < 0.5  # the token mean does not help
    assert float(stats["per_token"]["act_token_entropy/act"]) > 0.9  # each token re-centred
    assert float(stats["per_token"]["act_entropy/act"]) > 0.95
    for m in stats.values():
        assert float(m["act_token_entropy/act"]) <= 1.0 and float(m["act_entropy/act"]) <= 1.0


def test_binary_linear_matches_explicit_pm1_matmul():
    din, dout = 24, 10
    layer = BinaryLinear(din, dout, BIN, rngs=nnx.Rngs(0))
    kx, kb, kw = jax.random.split(jax.random.key(3), 3)
    beta = 0.3 * jax.random.normal(kb, (din,))
    layer.act.shift.beta[...] = beta
    layer.bias[...] = jnp.arange(dout, dtype=jnp.float32) / 10
    w = np.array(layer.kernel[...])
    w[0, 0] = 0.0  # sign(0) = +1
    w[1, 1] = 2.0  # beyond the clip: forward is still its sign
    layer.kernel[...] = jnp.asarray(w)
    x = np.array(jax.random.normal(kx, (2, 5, din)))
    x[0, 0, 3] = float(beta[3])  # x - beta == 0 -> +1

    xb = _pm1(x - np.asarray(beta))  # explicit +-1 tensors
    wb = _pm1(w)
    alpha = np.abs(w.astype(np.float64)).mean(axis=0)  # exact (float64)
    bias = np.asarray(layer.bias[...], np.float64)
    ints = xb @ wb  # exact integers
    expected = ints * alpha + bias
    y = layer(jnp.asarray(x))
    # The layer: exact integer, times alpha (a float32 mean of 24: gamma_n(25) relative), one multiply,
    # one add: |error| <= gamma_n(26) * |int * alpha| + u * |y|.
    assert_within(y, expected, gamma_n(26) * np.abs(ints * alpha) + U32 * np.abs(expected), "BinaryLinear")
    assert set(np.unique(xb)) == {-1.0, 1.0}


@pytest.mark.parametrize("din", [36, 384, 1536])
def test_binary_linear_equals_packed_layer_bit_for_bit(din):
    """``y = (x_b @ sign(W)) * alpha + b``: the exact integer, then the scale and bias in float32 --
    the packed layer's arithmetic, so the two agree exactly (summing ``+-alpha`` terms in float,
    ``x_b @ (alpha * sign(W))``, does not)."""
    from bvit_jax.deploy.bitops import pack_signs, to_planes
    from bvit_jax.deploy.packed import packed_linear_block
    from bvit_jax.nn.binarize import channel_alpha

    dout = 40
    layer = BinaryLinear(din, dout, BIN, rngs=nnx.Rngs(din))
    kx, kb, kw, kc = jax.random.split(jax.random.key(din), 4)
    layer.act.shift.beta[...] = 0.3 * jax.random.normal(kb, (din,))
    layer.kernel[...] = layer.kernel[...] + 0.05 * jax.random.normal(kw, (din, dout))
    layer.bias[...] = 0.1 * jax.random.normal(kc, (dout,))
    x = jax.random.normal(kx, (4, 33, din))
    y = np.asarray(nnx.jit(lambda m, x: m(x))(layer, x))

    kernel = np.asarray(layer.kernel[...])
    tensors = {  # the exported layer (bvit_jax.deploy.export): plane-order sign bits, alpha, bias, shift
        "l/linear/kernel_bits": jnp.asarray(to_planes(pack_signs(kernel, axis=0), din, axis=0)),
        "l/linear/alpha": channel_alpha(layer.kernel[...])[0],
        "l/linear/bias": layer.bias[...],
        "l/linear/act/shift/beta": layer.act.shift.beta[...],
    }
    packed = np.asarray(jax.jit(lambda t, x: packed_linear_block(x, t, "l", BIN))(tensors, x))
    np.testing.assert_array_equal(y, packed)

    xb = np.where(np.asarray(x - layer.act.shift.beta[...]) >= 0, 1, -1)
    ints = xb @ np.where(kernel >= 0, 1, -1)  # exact (int64)
    prod = ints * np.asarray(tensors["l/linear/alpha"], np.float64)
    expected = prod + np.asarray(layer.bias[...], np.float64)
    # float32: fl(fl(int * alpha) + b), the integer exact: one rounding of the product, one of the sum
    assert_within(y, expected, U32 * np.abs(prod) + U32 * np.abs(y), "against exact")


def test_fp_binary_linear_is_plain_linear():
    layer = BinaryLinear(6, 3, BinaryOptions(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (5, 6))
    xn, wn, bn = (np.asarray(a, np.float64) for a in (x, layer.kernel[...], layer.bias[...]))
    # 6 products summed, then the bias: gamma_n(8) * (|x| @ |W| + |b|)
    assert_within(layer(x), xn @ wn + bn, gamma_n(8) * (np.abs(xn) @ np.abs(wn) + np.abs(bn)), "fp BinaryLinear")


def test_match_width_repeat_and_average():
    x = jax.random.normal(jax.random.key(5), (2, 3, 4))
    np.testing.assert_array_equal(match_width(x, 4), x)
    rep = np.asarray(match_width(x, 12))
    for k in range(3):
        np.testing.assert_array_equal(rep[..., 4 * k : 4 * (k + 1)], x)
    y = jax.random.normal(jax.random.key(6), (2, 3, 12))
    avg = np.asarray(match_width(y, 4))
    y = np.asarray(y, np.float64)
    # a float32 mean of 3: two additions and a division (or a multiply by fl(1/3)): gamma_n(4) * mean |y|
    abs_mean = (np.abs(y[..., 0:4]) + np.abs(y[..., 4:8]) + np.abs(y[..., 8:12])) / 3
    assert_within(avg, (y[..., 0:4] + y[..., 4:8] + y[..., 8:12]) / 3, gamma_n(4) * abs_mean, "average")
    with pytest.raises(ValueError, match="cannot match"):
        match_width(x, 6)


def test_linear_block_shortcut():
    opts = dataclasses.replace(BIN, linear_shortcut=True)
    blk = LinearBlock(8, 16, opts, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (2, 3, 8))
    y = blk.linear(x)
    np.testing.assert_allclose(blk(x), jnp.tile(x, (1, 1, 2)) + blk.norm(y), rtol=1e-5, atol=1e-6)


def test_branch_norm_is_validated_and_layernorm_stays_the_default():
    with pytest.raises(ValueError, match=r"branch_norm='groupnorm' is not one of \['layernorm', 'batchnorm', 'affine'"):
        dataclasses.replace(BIN, branch_norm="groupnorm")
    assert BinaryOptions().branch_norm == "layernorm" == BRANCH_NORMS[0]
    blk = LinearBlock(8, 16, dataclasses.replace(BIN, linear_shortcut=True), rngs=nnx.Rngs(0))
    assert isinstance(blk.norm, LayerNorm)  # today's module, parameters norm/scale and norm/bias


def _affine_block(din, dout, seed=0):
    """A perturbed ``branch_norm='affine'`` LinearBlock (every parameter off its init)."""
    blk = LinearBlock(din, dout, dataclasses.replace(BIN, linear_shortcut=True, branch_norm="affine"), rngs=nnx.Rngs(0))
    ks = jax.random.split(jax.random.key(seed), 5)
    blk.linear.act.shift.beta[...] = 0.3 * jax.random.normal(ks[0], (din,))
    blk.linear.kernel[...] = blk.linear.kernel[...] + 0.05 * jax.random.normal(ks[1], (din, dout))
    blk.linear.bias[...] = 0.1 * jax.random.normal(ks[2], (dout,))
    blk.norm.scale[...] = 1 + 0.5 * jax.random.normal(ks[3], (dout,))
    blk.norm.bias[...] = 0.1 * jax.random.normal(ks[4], (dout,))
    return blk


@pytest.mark.parametrize("din, dout", [(12, 24), (24, 12), (36, 36)])
def test_affine_branch_is_the_folded_per_channel_affine(din, dout):
    """``match(x) + (linear(x) * scale + bias)``, computed as ``d * (alpha*scale) + (b*scale + bias)``."""
    fresh = LinearBlock(
        din, dout, dataclasses.replace(BIN, linear_shortcut=True, branch_norm="affine"), rngs=nnx.Rngs(0)
    )
    assert isinstance(fresh.norm, BranchAffine)
    np.testing.assert_array_equal(fresh.norm.scale[...], 1.0)
    np.testing.assert_array_equal(fresh.norm.bias[...], 0.0)
    blk = _affine_block(din, dout)
    x = jax.random.normal(jax.random.key(9), (2, 7, din))
    y = np.asarray(nnx.jit(lambda m, x: m(x))(blk, x))
    xb = _pm1(np.asarray(x - blk.linear.act.shift.beta[...]))
    w = np.asarray(blk.linear.kernel[...], np.float64)
    ints = xb @ _pm1(w)  # exact
    alpha, scale = np.abs(w).mean(0), np.asarray(blk.norm.scale[...], np.float64)
    b, nb = np.asarray(blk.linear.bias[...], np.float64), np.asarray(blk.norm.bias[...], np.float64)
    branch = (ints * alpha + b) * scale + nb
    expected = np.asarray(match_width(x, dout), np.float64) + branch
    # float32 roundings: alpha (a mean of din terms, gamma_{din+1}), alpha*scale, the product with the integer,
    # b*scale, + bias, + product, + shortcut (the shortcut itself: a mean of at most 2 groups, gamma_3):
    # |error| <= gamma_{din+4} |ints alpha scale| + gamma_3 (|b scale| + |nb|) + gamma_3 |match| + u |y|.
    bound = (
        gamma_n(din + 4) * np.abs(ints * alpha * scale)
        + gamma_n(3) * (np.abs(b * scale) + np.abs(nb) + np.abs(np.asarray(match_width(x, dout))))
        + U32 * np.abs(expected)
    )
    assert_within(y, expected, bound, "affine LinearBlock")


def test_affine_branch_gradients_are_those_of_the_unfolded_formula():
    """The folded forward has the gradients of ``match(x) + linear(x) * scale + bias`` (``alpha`` detached)."""
    blk = _affine_block(24, 12, seed=4)
    x = jax.random.normal(jax.random.key(2), (3, 5, 24))
    g = jax.random.normal(jax.random.key(8), (3, 5, 12))

    def unfolded(m, x):
        return match_width(x, 12) + m.norm(m.linear(x))  # BranchAffine.__call__ on BinaryLinear.__call__

    def loss(m, f):
        return jnp.sum(g * f(m, x))

    got = nnx.grad(lambda m: loss(m, lambda m, x: m(x)))(blk)
    want = nnx.grad(lambda m: loss(m, unfolded))(blk)
    got, want = dict(flatten_with_paths(nnx.to_pure_dict(got))), dict(flatten_with_paths(nnx.to_pure_dict(want)))
    assert (
        got.keys()
        == want.keys()
        == {"linear/kernel", "linear/bias", "linear/act/shift/beta", "norm/scale", "norm/bias"}
    )
    # Each gradient entry is a sum over at most R = 15 rows (x 24 inputs for beta) of terms that the two
    # forms compute with at most 4 roundings each in a different order: |diff| <= 2 gamma_{R*24+4} sum|terms|,
    # and sum|terms| <= the gradient of the same loss with |g| and every factor in absolute value, bounded
    # here by sum|g| * max|factor| per entry (a factor: |alpha scale| <= 1, |y| <= max|branch input|).
    scale = float(np.max(np.abs(np.asarray(blk.norm.scale[...]))))
    y = np.abs(np.asarray(blk.linear(x)))
    mass = float(np.sum(np.abs(np.asarray(g)))) * max(1.0, scale) * max(1.0, float(y.max()))
    for path in got:
        assert_within(got[path], want[path], 2 * gamma_n(15 * 24 + 4) * mass, path)


def _batchnorm_block(din, dout, seed=0):
    """A ``branch_norm='batchnorm'`` LinearBlock with its linear, scale, bias and running statistics moved."""
    opts = dataclasses.replace(BIN, linear_shortcut=True, branch_norm="batchnorm")
    blk = LinearBlock(din, dout, opts, rngs=nnx.Rngs(0))
    assert blk.linear.bias is None  # the batch mean would remove it: no bias before a BatchNorm
    ks = jax.random.split(jax.random.key(seed), 7)
    blk.linear.act.shift.beta[...] = 0.3 * jax.random.normal(ks[0], (din,))
    blk.linear.kernel[...] = blk.linear.kernel[...] + 0.05 * jax.random.normal(ks[1], (din, dout))
    blk.norm.scale[...] = 1 + 0.5 * jax.random.normal(ks[3], (dout,))
    blk.norm.bias[...] = 0.1 * jax.random.normal(ks[4], (dout,))
    blk.norm.mean[...] = 0.2 * jax.random.normal(ks[5], (dout,))
    blk.norm.var[...] = 0.05 + jax.random.uniform(ks[6], (dout,))
    return blk


def test_batchnorm_branch_trains_on_batch_statistics_and_moves_the_running_averages():
    """Training view: ``match(x) + (y - mu) / sqrt(var + eps) * scale + bias`` with ``mu``, ``var`` of each
    channel over batch and tokens; the running averages move to ``m r + (1 - m) batch statistic``."""
    din, dout, (b, n) = 24, 12, (3, 5)
    blk = _batchnorm_block(din, dout)
    assert isinstance(blk.norm, BranchBatchNorm) and blk.norm.use_running_average  # built for inference
    r_mean, r_var = np.asarray(blk.norm.mean[...], np.float64), np.asarray(blk.norm.var[...], np.float64)
    x = jax.random.normal(jax.random.key(9), (b, n, din))
    y = np.asarray(blk.linear(x), np.float64)  # the branch input (float32 values)
    train = training_view(blk)
    out = np.asarray(train(x))
    assert blk.norm.use_running_average  # the view did not switch the model itself
    mu, var = y.mean((0, 1)), y.var((0, 1))
    scale, bias = np.asarray(blk.norm.scale[...], np.float64), np.asarray(blk.norm.bias[...], np.float64)
    z = (y - mu) / np.sqrt(var + BRANCH_BN_EPSILON)
    shortcut = np.asarray(match_width(x, dout), np.float64)
    expected = shortcut + z * scale + bias
    # float32 bounds, R = b*n rows per channel: mu (a sum of R terms, then / R): gamma_{R+1} mean|y|;
    # var = mean(y^2) - mu^2 (flax's fast variance): gamma_{R+3} (mean(y^2) + mu^2) + 2 |mu| dmu;
    # r = rsqrt(var + eps) (add, rsqrt as 1/sqrt: 3 roundings) moves by <= dvar / (2 (var + eps)) + gamma_3;
    # z = (y - mu) r: |dz| <= (dmu + gamma_1 |y - mu|) r + |z| (dr + gamma_1); then * scale, + bias,
    # + shortcut (a repeat: exact here, dout = din / 2 -> a mean of 2 groups: gamma_2): gamma_3 of the terms.
    R = b * n
    dmu = gamma_n(R + 1) * np.abs(y).mean((0, 1))
    dvar = gamma_n(R + 3) * ((y**2).mean((0, 1)) + mu**2) + 2 * np.abs(mu) * dmu
    r = 1 / np.sqrt(var + BRANCH_BN_EPSILON)
    dr = dvar / (2 * (var + BRANCH_BN_EPSILON)) + gamma_n(3)
    dz = (dmu + U32 * np.abs(y - mu)) * r + np.abs(z) * (dr + U32)
    bound = np.abs(scale) * dz + gamma_n(3) * (np.abs(z * scale) + np.abs(bias) + np.abs(shortcut))
    assert_within(out, expected, bound, "batchnorm branch (training)")
    # the running averages moved (in the model itself: the view shares its arrays)
    m = BRANCH_BN_MOMENTUM  # flax averages the biased batch variance, the one the normalisation uses
    want_mean, want_var = m * r_mean + (1 - m) * mu, m * r_var + (1 - m) * var
    got_mean, got_var = np.asarray(blk.norm.mean[...]), np.asarray(blk.norm.var[...])
    assert_within(got_mean, want_mean, (1 - m) * dmu + gamma_n(3) * (np.abs(m * r_mean) + np.abs(want_mean)), "mean")
    assert_within(got_var, want_var, (1 - m) * dvar + gamma_n(3) * (np.abs(m * r_var) + np.abs(want_var)), "var")


@pytest.mark.parametrize("din, dout", [(12, 24), (24, 12), (36, 36)])
def test_batchnorm_branch_at_inference_is_the_running_average_map_folded(din, dout):
    """Eval (the model as built): ``match(x) + (linear(x) - mean) / sqrt(var + eps) * scale + bias`` with the
    running averages (``linear(x) = d * alpha``, no bias), computed as ``d * (alpha * s) + (bias - mean * s)``,
    ``s = scale / sqrt(var + eps)``."""
    blk = _batchnorm_block(din, dout, seed=din)
    x = jax.random.normal(jax.random.key(9), (2, 7, din))
    got = np.asarray(nnx.jit(lambda m, x: m(x))(blk, x))
    xb = _pm1(np.asarray(x - blk.linear.act.shift.beta[...]))
    w = np.asarray(blk.linear.kernel[...], np.float64)
    ints = xb @ _pm1(w)  # exact
    alpha = np.abs(w).mean(0)
    scale, bias = np.asarray(blk.norm.scale[...], np.float64), np.asarray(blk.norm.bias[...], np.float64)
    mean, var = np.asarray(blk.norm.mean[...], np.float64), np.asarray(blk.norm.var[...], np.float64)
    s = scale / np.sqrt(var + BRANCH_BN_EPSILON)
    shortcut = np.asarray(match_width(x, dout), np.float64)
    expected = shortcut + (ints * alpha - mean) * s + bias
    # float32 roundings: s = scale * rsqrt(var + eps) (add, sqrt, divide, multiply: gamma_4); alpha (a mean of
    # din terms: gamma_{din+1}); alpha * s and the product with the integer (2 more): gamma_{din+7} |ints alpha s|;
    # the folded bias 0*s + (bias - mean*s) (s: gamma_4, a product, a sum) and the final 2 sums:
    # gamma_8 (|mean s| + |bias|); the shortcut: gamma_3 |match|.
    bound = (
        gamma_n(din + 7) * np.abs(ints * alpha * s)
        + gamma_n(8) * (np.abs(mean * s) + np.abs(bias))
        + gamma_n(3) * np.abs(shortcut)
        + U32 * np.abs(expected)
    )
    assert_within(got, expected, bound, "batchnorm LinearBlock at inference")


def test_rprelu_formula():
    d = 6
    m = RPReLU(d)
    gamma = np.array([0.0, 0.5, -0.5, 1.0, 0.2, -1.0], np.float32)
    zeta = np.array([0.1, -0.2, 0.0, 0.3, 0.0, 1.0], np.float32)
    slope = np.array([0.25, 0.1, 0.5, 0.0, -0.3, 1.0], np.float32)
    m.gamma[...], m.zeta[...], m.slope[...] = jnp.asarray(gamma), jnp.asarray(zeta), jnp.asarray(slope)
    x = np.asarray(jax.random.normal(jax.random.key(8), (4, 9, d)))
    z = x.astype(np.float64) - gamma
    expected = np.where(z >= 0, z, slope * z) + zeta
    # float32: the subtraction, the product (slope * z) and the sum each round once (an FMA rounds less)
    bound = gamma_n(3) * (np.abs(np.where(z >= 0, z, slope * z)) + np.abs(zeta) + np.abs(expected))
    assert_within(m(jnp.asarray(x)), expected, bound, "RPReLU")
    # default init: PReLU with slope 0.25, no shifts (exact: 0.25 * x is a power-of-two scaling)
    m0 = RPReLU(d)
    np.testing.assert_array_equal(m0(jnp.asarray(x)), np.where(x >= 0, x, np.float32(0.25) * x))


# ----------------------------------------------------------------------------- attention level c > 0
ATT = BinaryOptions(
    binarize_weights=True, binarize_acts=True, learnable_shift=True, binary_attention=True, linear_shortcut=True
)


def _attention(opts=ATT, seed=0):
    return Attention(16, 2, 9, opts, rngs=nnx.Rngs(seed))


def test_attention_level_starts_at_its_init():
    for opts, c0 in ((ATT, 1 / 9), (dataclasses.replace(ATT, attn_level_init=0.3), 0.3)):
        c = float(_attention(opts).level())
        assert abs(c - c0) <= 8 * U32 * c0  # raw rounded to float32, softplus and the floor: a few ulp
    with pytest.raises(ValueError, match="attn_level_init"):
        dataclasses.replace(ATT, attn_level_init=0.0)
    with pytest.raises(ValueError, match="attn_level_init"):
        dataclasses.replace(ATT, attn_level_init=-0.1)
    assert Attention(16, 2, 9, BinaryOptions(), rngs=nnx.Rngs(0)).level() is None


@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["down", "up"])
def test_no_optimizer_step_makes_the_attention_level_non_positive(direction):
    """Huge SGD steps (lr 1e6) on c itself and on the layer's output, in both directions."""
    attn = _attention()
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    up = jax.random.normal(jax.random.key(2), (2, 9, 16))
    graphdef, params = nnx.split(attn, nnx.Param)
    tx = optax.sgd(1e6)
    state = tx.init(params)

    def level(p):
        return nnx.merge(graphdef, p).level()

    def out(p):
        return jnp.sum(up * nnx.merge(graphdef, p)(x))

    for loss in (lambda p: direction * level(p), lambda p: direction * out(p)) * 3:
        grads = jax.grad(loss)(params)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        c = float(level(params))
        assert c > 0 and np.isfinite(c), c
        assert c >= np.float32(LEVEL_MIN)
        y = nnx.merge(graphdef, params)(x)
        assert bool(jnp.all(jnp.isfinite(y)))
        g_all = jax.grad(out)(params)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_all))
    if direction > 0:
        assert float(level(params)) == np.float32(LEVEL_MIN)  # pushed to the floor, not past it


def test_lsq_grad_scale_scales_only_the_level_gradient():
    x = jax.random.normal(jax.random.key(3), (2, 9, 16))
    up = jax.random.normal(jax.random.key(4), (2, 9, 16))
    plain, scaled = _attention(ATT, 5), _attention(dataclasses.replace(ATT, attn_level_grad_scale=True), 5)
    np.testing.assert_array_equal(plain(x), scaled(x))  # the forward is bit for bit the same
    g0 = nnx.grad(lambda m: jnp.sum(up * m(x)))(plain)
    g1 = nnx.grad(lambda m: jnp.sum(up * m(x)))(scaled)
    g = lsq_grad_scale(2 * 9 * 9)  # N = heads * tokens^2 per image, Q_P = 1
    a, b = float(g0["attn_level_raw"][...]), float(g1["attn_level_raw"][...])
    assert a != 0
    assert abs(b - g * a) <= gamma_n(3) * abs(g * a)  # one extra multiply (plus g's own rounding)
    for path, leaf in nnx.to_flat_state(g0):
        if path[-1] != "attn_level_raw":
            other = dict(nnx.to_flat_state(g1))[path]
            np.testing.assert_array_equal(leaf[...], other[...], err_msg=str(path))


# ----------------------------------------------------------------------------- drop path (stochastic depth)
def test_drop_path_keeps_or_zeroes_each_example_whole_with_the_rate_and_rescales_the_kept():
    """Each example's branch is either zeroed or multiplied by fl(1 / (1 - r)), as a whole; the share kept
    over B = 4096 examples is 1 - r within 5 binomial standard deviations (sqrt(B r (1 - r)) / B = 0.72 %
    for r = 0.3: the keys are fixed, so the test is deterministic; a biased draw, e.g. r applied per
    element or a keep rate of r instead of 1 - r, lands tens of deviations away). No keys: the identity."""
    from bvit_jax.nn.blocks import drop_path

    b, r = 4096, 0.3
    x = jax.random.normal(jax.random.key(0), (b, 3, 5)) + 3.0  # nonzero everywhere
    keys = jax.random.split(jax.random.key(1), b)
    y = np.asarray(drop_path(x, r, keys))
    xs = np.asarray(x)
    kept = np.all(y != 0, axis=(1, 2))
    dropped = np.all(y == 0, axis=(1, 2))
    assert np.all(kept | dropped)  # whole examples only
    np.testing.assert_array_equal(y[kept], xs[kept] * np.float32(1.0 / (1.0 - r)))
    sd = np.sqrt(b * r * (1 - r))
    assert abs(kept.sum() - b * (1 - r)) <= 5 * sd, kept.sum()
    # the mean of the kept-and-rescaled branch is the branch's: E[y] = x within the same 5 deviations
    assert abs(y[:, 0, 0].sum() / xs[:, 0, 0].sum() - 1) <= 5 * sd / (b * (1 - r))
    # each example's draw depends on its own key only: the same keys in another batch, the same result
    np.testing.assert_array_equal(np.asarray(drop_path(x[::7], r, keys[::7])), y[::7])
    assert drop_path(x, r, None) is x and drop_path(x, 0.0, keys) is x


def test_block_drop_path_is_the_residual_form_with_each_branch_s_own_mask():
    """``Block`` with rate r and per-example keys computes ``h = x + D_0(attn(norm1(x)))``, ``out = h +
    D_1(mlp(norm2(h)))`` with ``D_i`` the drop of key ``fold_in(key_b, i)`` (written out here with
    ``bernoulli``), bit for bit (the same float32 operations, eagerly); without keys the block equals the
    same block built with rate 0 bit for bit."""
    from bvit_jax.nn.blocks import Block

    r, b = 0.5, 16
    blk = Block(16, 2, 2.0, 5, BIN, rngs=nnx.Rngs(0), drop_path_rate=r)
    ref = Block(16, 2, 2.0, 5, BIN, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (b, 5, 16))
    keys = jax.random.split(jax.random.key(3), b)
    scale = np.float32(1.0 / (1.0 - r))

    def mask(i):
        keep = np.array([bool(jax.random.bernoulli(jax.random.fold_in(k, i), 1.0 - r)) for k in keys])
        return keep, jnp.asarray(np.where(keep, scale, np.float32(0)))[:, None, None]

    (keep_a, m_a), (keep_m, m_m) = mask(0), mask(1)
    assert 0 < keep_a.sum() < b and 0 < keep_m.sum() < b and np.any(keep_a != keep_m)  # both kinds, per branch
    h = x + blk.attn(blk.norm1(x)) * m_a
    expected = h + blk.mlp(blk.norm2(h)) * m_m
    np.testing.assert_array_equal(np.asarray(blk(x, keys=keys)), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(blk(x)), np.asarray(ref(x)))
    # a dropped example skips the branch entirely: both branches dropped -> the input itself
    both = ~keep_a & ~keep_m
    assert both.any()
    np.testing.assert_array_equal(np.asarray(blk(x, keys=keys))[both], np.asarray(x)[both])


def test_drop_path_rate_outside_0_1_is_refused():
    from bvit_jax.nn.blocks import Block

    for r in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop path rate must be in"):
            Block(8, 2, 2.0, 5, BIN, rngs=nnx.Rngs(0), drop_path_rate=r)


# ----------------------------------------------------------------------------- Le & Li's switches
LELI = dataclasses.replace(ATT, rprelu=True)


def _perturbed_rprelus(module, seed=5):
    """Every RPReLU of ``module`` moved off its init (shifts 0, slope 0.25), so each one shows in the output."""
    for i, (_, m) in enumerate(nnx.iter_modules(module)):
        if isinstance(m, RPReLU):
            k = jax.random.split(jax.random.key(seed + i), 3)
            m.gamma[...] = 0.3 * jax.random.normal(k[0], m.gamma.shape)
            m.zeta[...] = 0.3 * jax.random.normal(k[1], m.zeta.shape)
            m.slope[...] = jax.random.uniform(k[2], m.slope.shape, minval=-0.5, maxval=0.5)
    return module


def test_rprelu_everywhere_follows_every_block_linear_and_the_attention_output():
    """``rprelu_everywhere``: each block linear is ``RPReLU(match(x) + N(linear(x)))`` with its own RPReLU
    (the same block without the switch, same parameters, then that RPReLU: bit-identical, the same float
    operations in the same order); a block holds 7 (Q, K, V, proj, fc1, fc2, the attention output) and
    the MLP adds no activation of its own; without ``rprelu`` the switch is refused."""
    from bvit_jax.nn.blocks import Block

    opts = dataclasses.replace(LELI, rprelu_everywhere=True)
    blk = _perturbed_rprelus(LinearBlock(8, 16, opts, rngs=nnx.Rngs(0)))
    plain = LinearBlock(8, 16, LELI, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (2, 3, 8))
    np.testing.assert_array_equal(blk(x), blk.out_act(plain(x)))
    block = Block(16, 2, 4.0, 9, opts, rngs=nnx.Rngs(0))
    rprelus = sorted("/".join(map(str, p)) for p, m in nnx.iter_modules(block) if isinstance(m, RPReLU))
    linears = ["attn/q", "attn/k", "attn/v", "attn/proj", "mlp/fc1", "mlp/fc2"]
    assert rprelus == sorted([f"{n}/out_act" for n in linears] + ["attn/context_act"])
    assert block.mlp.act is None and not block.mlp.gelu
    with pytest.raises(ValueError, match="set model.overrides.rprelu=True with it"):
        dataclasses.replace(ATT, rprelu_everywhere=True)


def test_attention_bypass_adds_the_real_q_k_v_to_the_normalised_binary_attention():
    """``attention_bypass``: the output is ``proj(LN(P_b V_b) + q + k + v)`` (composed here from the module's
    own pieces: bit-identical), and it carries real information the binary attention drops: a nudge of the
    input too small to flip any sign leaves the plain binary attention's output bit for bit unchanged
    (everything before ``proj`` is a function of the signs) and moves the bypass's."""
    opts = dataclasses.replace(LELI, attention_bypass=True)
    attn, plain = _attention(opts), _attention(LELI)
    for m in (attn, plain):
        m.attn_level_raw[...] = jnp.asarray(0.3)
        for s in (m.q_sign, m.k_sign, m.v_sign):
            s.shift.beta[...] = 0.1 * jax.random.normal(jax.random.key(3), s.shift.beta.shape)
    x = jax.random.normal(jax.random.key(2), (2, 9, 16))

    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    qb, kb, vb = (rearrange_heads(s(t), 2) for s, t in ((attn.q_sign, q), (attn.k_sign, k), (attn.v_sign, v)))
    probs = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", qb, kb) / jnp.sqrt(8.0).astype(qb.dtype), axis=-1)
    out = attn.prob_binarizer.matmul(probs, attn.level(), vb)
    out = out.transpose(0, 2, 1, 3).reshape(2, 9, 16)
    np.testing.assert_array_equal(attn(x), attn.proj(attn.context_norm(out) + q + k + v))

    def signs(m, x):  # every sign input of the attention (its linears' and Q, K, V's), as booleans
        _, inter = nnx.capture(m, nnx.Intermediate)(x, capture=True)
        flat = [(k, v.get_value() if hasattr(v, "get_value") else v) for k, v in nnx.to_flat_state(inter)]
        return [np.asarray(v[0]) >= 0 for k, v in flat if str(k[-1]) == "shifted"]

    nudged = x + 1e-4 * jax.random.normal(jax.random.key(4), x.shape)
    for m in (attn, plain):  # the nudge flips no sign of either model
        for a, b in zip(signs(m, x), signs(m, nudged)):
            np.testing.assert_array_equal(a, b)
    before, after = np.asarray(plain(x)), np.asarray(plain(nudged))
    # plain: proj(ctx) with ctx unchanged; proj's shortcut carries ctx, not x, so nothing moves
    np.testing.assert_array_equal(before, after)
    assert not np.array_equal(np.asarray(attn(x)), np.asarray(attn(nudged)))
    with pytest.raises(ValueError, match="needs model.overrides.binary_attention=True"):
        dataclasses.replace(BIN, attention_bypass=True)


def rearrange_heads(t, heads):
    """``(b, n, h * d) -> (b, h, n, d)``."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)


def test_le_li_switches_are_refused_by_the_packed_forward():
    """Neither switch is in the packed forward (it would ignore their parameters): export refuses, naming it."""
    from bvit_jax.deploy.export import pack_model
    from bvit_jax.nn.models import create

    for switch in ("rprelu_everywhere", "attention_bypass"):
        model = create("vit_nano", "binaryvit", **{switch: True})
        with pytest.raises(ValueError, match=f"does not compute model.{switch}"):
            pack_model(model)
