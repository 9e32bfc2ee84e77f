"""Binarizers: forward values and surrogate gradients against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bvit_jax.binarize import (
    approx_sign,
    binary_matmul,
    elastic_binarize,
    elastic_matmul,
    get_activation_binarizer,
    sign,
    ste_sign,
    weight_alpha,
    weight_binarize,
)

# Points outside the clip, on its edges, inside, and exactly 0.
X = np.array([-3.0, -1.5, -1.0, -0.75, -0.25, -1e-3, 0.0, 1e-3, 0.25, 0.75, 1.0, 1.5, 3.0], np.float32)
SIGN_X = np.where(X >= 0, 1.0, -1.0)


def _vjp(f, x, upstream):
    """d/dx sum(upstream * f(x)): the backward of f applied to ``upstream``."""
    return jax.grad(lambda z: jnp.sum(upstream * f(z)))(x)


def test_sign_of_zero_is_plus_one():
    assert float(sign(jnp.float32(0.0))) == 1.0
    assert float(sign(jnp.float32(-0.0))) == 1.0  # -0.0 >= 0
    np.testing.assert_array_equal(sign(jnp.asarray(X)), SIGN_X)


@pytest.mark.parametrize("f", [ste_sign, approx_sign], ids=["ste", "approx"])
def test_activation_binarizer_forward(f):
    y = np.asarray(f(jnp.asarray(X)))
    np.testing.assert_array_equal(y, SIGN_X)
    assert set(np.unique(y)) == {-1.0, 1.0}  # no third level at 0


def test_ste_sign_gradient_is_clipped_identity():
    up = np.linspace(0.5, 2.0, X.size).astype(np.float32)  # non-constant upstream
    g = np.asarray(_vjp(ste_sign, jnp.asarray(X), jnp.asarray(up)))
    np.testing.assert_allclose(g, up * (np.abs(X) <= 1.0), rtol=0, atol=0)
    # edges |x| = 1 are inside the clip
    assert g[list(X).index(-1.0)] == up[list(X).index(-1.0)]
    assert g[list(X).index(1.0)] == up[list(X).index(1.0)]


def test_approx_sign_gradient_per_piece():
    up = np.linspace(0.5, 2.0, X.size).astype(np.float32)
    g = np.asarray(_vjp(approx_sign, jnp.asarray(X), jnp.asarray(up)))
    # Bi-Real Net: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere.
    d = np.where((X >= -1) & (X < 0), 2 + 2 * X, np.where((X >= 0) & (X < 1), 2 - 2 * X, 0.0))
    np.testing.assert_allclose(g, up * d, rtol=1e-6, atol=1e-7)
    # spot values on each piece
    at = lambda v: g[list(X).index(v)] / up[list(X).index(v)]
    assert at(-0.75) == pytest.approx(0.5)
    assert at(-0.25) == pytest.approx(1.5)
    assert at(0.0) == pytest.approx(2.0)
    assert at(0.25) == pytest.approx(1.5)
    assert at(0.75) == pytest.approx(0.5)
    assert at(-1.5) == 0 and at(1.5) == 0 and at(3.0) == 0


def test_binarizers_under_jit_match_eager():
    x = jnp.asarray(X)
    for f in (ste_sign, approx_sign):
        np.testing.assert_array_equal(jax.jit(f)(x), f(x))
        np.testing.assert_array_equal(jax.jit(jax.grad(lambda z: f(z).sum()))(x), jax.grad(lambda z: f(z).sum())(x))


def test_get_activation_binarizer():
    assert get_activation_binarizer("ste") is ste_sign
    assert get_activation_binarizer("approx") is approx_sign
    with pytest.raises(ValueError, match="Unknown activation binarizer"):
        get_activation_binarizer("tanh")


def _kernel():
    # (in=4, out=3): columns of very different magnitude, entries beyond the clip, a zero.
    return np.array(
        [
            [0.5, -2.0, 0.01],
            [-0.25, 0.5, -0.02],
            [0.0, 1.5, 0.03],
            [1.25, -0.1, -0.04],
        ],
        np.float32,
    )


def test_weight_binarize_forward_alpha_per_output_channel():
    w = _kernel()
    alpha = np.abs(w).mean(axis=0)  # per output column
    np.testing.assert_allclose(alpha, [0.5, 1.025, 0.025], rtol=1e-6)
    wb = np.asarray(weight_binarize(jnp.asarray(w)))
    np.testing.assert_allclose(wb, alpha[None, :] * np.where(w >= 0, 1.0, -1.0), rtol=1e-6)
    assert wb[2, 0] == pytest.approx(alpha[0])  # sign(0) = +1
    np.testing.assert_array_equal(weight_binarize(jnp.asarray(w), scale=False), np.where(w >= 0, 1.0, -1.0))


def test_weight_binarize_gradient_is_alpha_times_clipped_ste():
    w = _kernel()
    alpha = np.abs(w).mean(axis=0)
    up = np.arange(1, w.size + 1, dtype=np.float32).reshape(w.shape) / 7.0
    g = np.asarray(_vjp(weight_binarize, jnp.asarray(w), jnp.asarray(up)))
    expected = alpha[None, :] * up * (np.abs(w) <= 1.0)  # alpha detached: no d alpha / dW term
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-7)
    assert g[0, 1] == 0 and g[2, 1] == 0 and g[3, 0] == 0  # |W| > 1: zero
    g_ns = np.asarray(_vjp(lambda z: weight_binarize(z, scale=False), jnp.asarray(w), jnp.asarray(up)))
    np.testing.assert_allclose(g_ns, up * (np.abs(w) <= 1.0), rtol=1e-6)


C = 0.1
# below 0, inside (rounds to 0), exactly c/2 (half-to-even -> 0), inside (rounds to 1), at c, above c
P = np.array([-0.05, 0.02, 0.05, 0.07, 0.1, 0.3], np.float32)


def test_elastic_binarize_forward():
    q = np.asarray(elastic_binarize(jnp.asarray(P), jnp.float32(C)))
    np.testing.assert_allclose(q, [0.0, 0.0, 0.0, C, C, C], rtol=1e-6, atol=0)
    assert set(np.round(q / C, 6)) <= {0.0, 1.0}


def test_elastic_binarize_gradients():
    up = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
    gp, gc = jax.grad(lambda p, c: jnp.sum(up * elastic_binarize(p, c)), argnums=(0, 1))(
        jnp.asarray(P), jnp.float32(C)
    )
    r = P / np.float32(C)  # float32, as the binarizer computes it (0.1f / 0.1f == 1 exactly)
    inside = (r >= 0) & (r <= 1)
    # d q / d p: straight-through inside [0, c], 0 outside
    np.testing.assert_allclose(np.asarray(gp), up * inside, rtol=0, atol=0)
    # d q / d c (LSQ): round(r) - r inside, 1 above c, 0 below 0
    dq_dc = np.where(inside, np.round(r) - r, np.where(r > 1, 1.0, 0.0))
    assert dq_dc[0] == 0.0  # below
    assert dq_dc[1] == pytest.approx(-0.2) and dq_dc[3] == pytest.approx(0.3)  # inside
    assert dq_dc[5] == 1.0  # above
    assert float(gc) == pytest.approx(float(np.sum(up * dq_dc)), rel=1e-5)
    assert np.shape(gc) == ()


def test_elastic_binarize_c_gradient_by_piece():
    """Each piece alone, so a wrong piece cannot hide in the sum."""
    for p, expected in [(-0.05, 0.0), (0.02, -0.2), (0.07, 0.3), (0.3, 1.0)]:
        gc = jax.grad(lambda c: elastic_binarize(jnp.float32(p), c))(jnp.float32(C))
        assert float(gc) == pytest.approx(expected, abs=1e-6), p


# --------------------------------------------------------------------------
# Fused forms: integer matmul first, then the scale (the packed forward's order).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n_in", [37, 384, 1536])
def test_binary_matmul_is_exact_integer_times_alpha(n_in):
    """``(x_b @ sign(W)) * alpha`` bit for bit; summing ``+-alpha`` in float (``x_b @ W_b``) is not."""
    kx, kw = jax.random.split(jax.random.key(n_in))
    x = sign(jax.random.normal(kx, (64, n_in)))
    w = 0.02 * jax.random.normal(kw, (n_in, 48))
    w = w.at[0, 0].set(0.0)  # sign(0) = +1
    ints = np.asarray(x).astype(np.int64) @ np.where(np.asarray(w) >= 0, 1, -1)  # exact integers
    alpha = np.asarray(weight_alpha(w))  # (1, out), as export computes it
    y = np.asarray(jax.jit(binary_matmul, static_argnums=2)(x, w, True))
    np.testing.assert_array_equal(y, ints.astype(np.float32) * alpha)  # one float32 rounding per element
    np.testing.assert_array_equal(np.asarray(binary_matmul(x, w, False)), ints.astype(np.float32))
    # The same values as the unfused product, to float rounding.
    np.testing.assert_allclose(y, np.asarray(x @ weight_binarize(w)), rtol=1e-5, atol=1e-6 * float(np.abs(y).max()))


@pytest.mark.parametrize("scale", [True, False])
def test_binary_matmul_gradients_equal_unfused(scale):
    """The gradients are those of ``x @ weight_binarize(W)``: alpha detached, clipped STE on W."""
    kx, kw, kg = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (20, 33))  # any x: the rule does not assume +-1 inputs
    w = 0.7 * jax.random.normal(kw, (33, 9))  # some |W| > 1: zero gradient there
    up = jax.random.normal(kg, (20, 9))
    fused = jax.grad(lambda x, w: jnp.sum(up * binary_matmul(x, w, scale)), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(up * (x @ weight_binarize(w, scale=scale))), argnums=(0, 1))(x, w)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(fused[1])[np.abs(np.asarray(w)) > 1] == 0)
    alpha = np.asarray(weight_alpha(w)) if scale else 1.0
    np.testing.assert_allclose(
        np.asarray(fused[1]), alpha * (np.asarray(x).T @ np.asarray(up)) * (np.abs(np.asarray(w)) <= 1), rtol=1e-5, atol=1e-6
    )


def _attention_operands(n=197, d=64, seed=0):
    kp, kv, kg = jax.random.split(jax.random.key(seed), 3)
    p = jax.nn.softmax(3 * jax.random.normal(kp, (2, 3, n, n)), axis=-1)
    v = sign(jax.random.normal(kv, (2, 3, n, d)))
    c = jnp.float32(1.3 / n)
    return p, c, v, jax.random.normal(kg, (2, 3, n, d))


def test_elastic_matmul_is_exact_integer_times_level():
    p, c, v, _ = _attention_operands()
    level = np.clip(np.round(np.asarray(p) / np.float32(c)), 0, 1)  # float32 p / c, as the binarizer
    ints = np.einsum("bhqk,bhkd->bhqd", level.astype(np.int64), np.asarray(v).astype(np.int64))
    out = np.asarray(jax.jit(elastic_matmul)(p, c, v))
    assert 0 < level.mean() < 1
    np.testing.assert_array_equal(out, ints.astype(np.float32) * np.float32(c))
    np.testing.assert_allclose(out, np.asarray(elastic_binarize(p, c) @ v), rtol=1e-5, atol=1e-6 * float(np.abs(out).max()))


def test_elastic_matmul_gradients_equal_unfused():
    """The gradients are those of ``elastic_binarize(P, c) @ V`` (STE for P, LSQ for c, plain for V)."""
    p, c, v, up = _attention_operands(n=37, d=12, seed=1)
    v = v * 0.5 + 0.1  # any V: the rule does not assume +-1 values
    fused = jax.grad(lambda p, c, v: jnp.sum(up * elastic_matmul(p, c, v)), argnums=(0, 1, 2))(p, c, v)
    plain = jax.grad(lambda p, c, v: jnp.sum(up * (elastic_binarize(p, c) @ v)), argnums=(0, 1, 2))(p, c, v)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert np.shape(fused[1]) == ()
