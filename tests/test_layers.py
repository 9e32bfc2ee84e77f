"""Layers: ASM/RSign, BinaryLinear against explicit +-1 arithmetic, match_width, RPReLU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bvit_jax import diagnostics
from bvit_jax.layers import BinaryLinear, BinaryOptions, LinearBlock, RPReLU, SignActivation, match_width

BIN = BinaryOptions(binarize_weights=True, binarize_acts=True, learnable_shift=True)
ASM = dataclasses.replace(BIN, asm=True)


def _pm1(a):
    return np.where(np.asarray(a) >= 0, 1.0, -1.0)


def test_untrained_asm_is_plain_sign():
    x = jax.random.normal(jax.random.key(0), (2, 7, 5)) + jnp.arange(5.0) * 3
    x = x.at[0, 0, 0].set(0.0)  # sign(0) = +1
    act = SignActivation(5, ASM)
    assert act.shift.beta is not None and act.shift.gamma is not None
    np.testing.assert_array_equal(act(x), _pm1(x))
    np.testing.assert_array_equal(SignActivation(5, BIN)(x), _pm1(x))


def test_shift_formula():
    x = jax.random.normal(jax.random.key(1), (3, 6, 4))
    act = SignActivation(4, ASM)
    beta = jnp.array([0.5, -0.5, 0.0, 1.0])
    gamma = jnp.array([0.0, 1.0, 0.5, -1.0])
    act.shift.beta[...] = beta
    act.shift.gamma[...] = gamma
    shift = beta + gamma * x.mean(axis=1, keepdims=True)
    np.testing.assert_array_equal(act(x), _pm1(x - shift))


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
    alpha = np.abs(w).mean(axis=0)
    expected = (xb @ wb) * alpha + np.asarray(layer.bias[...])
    y = layer(jnp.asarray(x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert set(np.unique(xb)) == {-1.0, 1.0}


@pytest.mark.parametrize("din", [36, 384, 1536])
def test_binary_linear_equals_packed_layer_bit_for_bit(din):
    """``y = (x_b @ sign(W)) * alpha + b``: the exact integer, then the scale and bias in float32 --
    the packed layer's arithmetic, so the two agree exactly (summing ``+-alpha`` terms in float,
    ``x_b @ (alpha * sign(W))``, does not)."""
    from bvit_jax.binarize import weight_alpha
    from bvit_jax.packed import _linear_block, pack_signs, to_planes

    dout = 40
    layer = BinaryLinear(din, dout, BIN, rngs=nnx.Rngs(din))
    kx, kb, kw, kc = jax.random.split(jax.random.key(din), 4)
    layer.act.shift.beta[...] = 0.3 * jax.random.normal(kb, (din,))
    layer.kernel[...] = layer.kernel[...] + 0.05 * jax.random.normal(kw, (din, dout))
    layer.bias[...] = 0.1 * jax.random.normal(kc, (dout,))
    x = jax.random.normal(kx, (4, 33, din))
    y = np.asarray(nnx.jit(lambda m, x: m(x))(layer, x))

    kernel = np.asarray(layer.kernel[...])
    tensors = {  # the exported layer (bvit_jax.export): plane-order sign bits, alpha, bias, shift
        "l/linear/kernel_bits": jnp.asarray(to_planes(pack_signs(kernel, axis=0), din, axis=0)),
        "l/linear/alpha": weight_alpha(layer.kernel[...])[0],
        "l/linear/bias": layer.bias[...],
        "l/linear/act/shift/beta": layer.act.shift.beta[...],
    }
    packed = np.asarray(jax.jit(lambda t, x: _linear_block(x, t, "l", BIN))(tensors, x))
    np.testing.assert_array_equal(y, packed)

    xb = np.where(np.asarray(x - layer.act.shift.beta[...]) >= 0, 1, -1)
    ints = xb @ np.where(kernel >= 0, 1, -1)  # exact (int64)
    expected = ints * np.asarray(tensors["l/linear/alpha"], np.float64) + np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)


def test_fp_binary_linear_is_plain_linear():
    layer = BinaryLinear(6, 3, BinaryOptions(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (5, 6))
    np.testing.assert_allclose(layer(x), x @ layer.kernel[...] + layer.bias[...], rtol=1e-6)


def test_match_width_repeat_and_average():
    x = jax.random.normal(jax.random.key(5), (2, 3, 4))
    np.testing.assert_array_equal(match_width(x, 4), x)
    rep = np.asarray(match_width(x, 12))
    for k in range(3):
        np.testing.assert_array_equal(rep[..., 4 * k : 4 * (k + 1)], x)
    y = jax.random.normal(jax.random.key(6), (2, 3, 12))
    avg = np.asarray(match_width(y, 4))
    y = np.asarray(y)
    np.testing.assert_allclose(avg, (y[..., 0:4] + y[..., 4:8] + y[..., 8:12]) / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot match"):
        match_width(x, 6)


def test_linear_block_shortcut():
    opts = dataclasses.replace(BIN, linear_shortcut=True)
    blk = LinearBlock(8, 16, opts, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (2, 3, 8))
    y = blk.linear(x)
    np.testing.assert_allclose(blk(x), jnp.tile(x, (1, 1, 2)) + blk.norm(y), rtol=1e-5, atol=1e-6)


def test_rprelu_formula():
    d = 6
    m = RPReLU(d)
    gamma = np.array([0.0, 0.5, -0.5, 1.0, 0.2, -1.0], np.float32)
    zeta = np.array([0.1, -0.2, 0.0, 0.3, 0.0, 1.0], np.float32)
    slope = np.array([0.25, 0.1, 0.5, 0.0, -0.3, 1.0], np.float32)
    m.gamma[...], m.zeta[...], m.slope[...] = jnp.asarray(gamma), jnp.asarray(zeta), jnp.asarray(slope)
    x = np.asarray(jax.random.normal(jax.random.key(8), (4, 9, d)))
    z = x - gamma
    expected = np.where(z >= 0, z, slope * z) + zeta
    np.testing.assert_allclose(m(jnp.asarray(x)), expected, rtol=1e-6, atol=1e-7)
    # default init: PReLU with slope 0.25, no shifts
    m0 = RPReLU(d)
    np.testing.assert_allclose(m0(jnp.asarray(x)), np.where(x >= 0, x, 0.25 * x), rtol=1e-6)
