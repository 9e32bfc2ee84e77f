"""Binarizers: forward values and surrogate gradients against their formulas.

Float comparisons use bounds derived from float32 arithmetic, never fixed
tolerances: a float32 sum of ``n`` products ``a_k b_k`` is within
``gamma_n(n) * sum |a_k b_k|`` of the exact value, ``gamma_n(n) = n u / (1 - n u)``,
``u = 2**-24`` (Higham, "Accuracy and Stability of Numerical Algorithms",
Sec. 3.1), whatever order the terms are added in (XLA and BLAS order them
differently on different CPUs: AVX2 vs AVX-512, thread counts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from bvit_jax.nn.binarize import (
    LEVEL_MIN,
    ApproxSign,
    ElasticBinarizer,
    SteSign,
    WeightBinarizer,
    approx_sign,
    binary_matmul,
    channel_alpha,
    elastic_binarize,
    elastic_matmul,
    get_activation_binarizer,
    lsq_grad_scale,
    positive_level,
    positive_level_inverse,
    scale_grad,
    sign,
    ste_sign,
    weight_binarize,
)
from tests.tolerances import U32, assert_within, gamma_n

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
    # d = 2 -+ 2x: 2x is exact, the sum one rounding, the product with up another: gamma_n(2) relative
    assert_within(g, up.astype(np.float64) * d.astype(np.float64), gamma_n(2) * np.abs(up * d), "ApproxSign")
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
        grad = jax.grad(lambda z, f=f: f(z).sum())
        np.testing.assert_array_equal(jax.jit(grad)(x), grad(x))


def test_get_activation_binarizer():
    assert get_activation_binarizer("ste") == SteSign()
    assert get_activation_binarizer("approx") == ApproxSign()
    with pytest.raises(ValueError, match="Unknown activation binarizer"):
        get_activation_binarizer("tanh")


def test_binarizer_objects_carry_name_precision_and_their_gradient():
    """Each object is its function (forward and custom backward) with a name and a precision of 1 bit."""
    x, up = jnp.asarray(X), jnp.asarray(np.linspace(-1, 1, X.size, dtype=np.float32))
    for obj, fn in ((SteSign(), ste_sign), (ApproxSign(), approx_sign)):
        assert obj.precision == 1 and get_activation_binarizer(obj.name) == obj
        np.testing.assert_array_equal(obj(x), fn(x))
        np.testing.assert_array_equal(_vjp(obj, x, up), _vjp(fn, x, up))
    w = jnp.asarray(_kernel())
    for scale in (True, False):
        wb = WeightBinarizer(scale=scale)
        assert wb.precision == 1 and wb != WeightBinarizer(scale=not scale)  # compared by value (jit cache key)
        np.testing.assert_array_equal(wb(w), weight_binarize(w, scale=scale))
        # alpha: (out,) = channel_alpha, ones without the scale, detached (no gradient reaches W through it)
        want = np.asarray(channel_alpha(w))[0] if scale else np.ones(3, np.float32)
        np.testing.assert_array_equal(wb.alpha(w), want)
        np.testing.assert_array_equal(jax.grad(lambda v, wb=wb: jnp.sum(wb.alpha(v)))(w), np.zeros_like(w))
        xs = jnp.asarray(np.sign(np.random.default_rng(0).standard_normal((5, 4))).astype(np.float32))
        np.testing.assert_array_equal(wb.matmul(xs, w), binary_matmul(xs, w, scale))
        np.testing.assert_array_equal(wb.unscaled_matmul(xs, w), binary_matmul(xs, w, False))
    p, c = jnp.asarray(np.linspace(0, 0.5, 12, dtype=np.float32).reshape(1, 3, 4)), jnp.float32(0.2)
    v = jnp.asarray(np.where(np.arange(8).reshape(1, 4, 2) % 3, 1.0, -1.0).astype(np.float32))
    eb = ElasticBinarizer()
    assert eb.precision == 1
    np.testing.assert_array_equal(eb(p, c), elastic_binarize(p, c))
    np.testing.assert_array_equal(eb.matmul(p, c, v), elastic_matmul(p, c, v))


def test_channel_alpha_is_the_mean_magnitude_over_all_axes_but_the_last():
    """``mean |x|`` per last-axis channel, exact for sums of a few powers of two."""
    x = np.array([[[0.5, -2.0], [-0.25, 0.0]], [[1.0, 4.0], [-0.25, -2.0]]], np.float32)  # (2, 2, 2)
    np.testing.assert_array_equal(channel_alpha(jnp.asarray(x)), [[[0.5, 2.0]]])


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
    exact = np.array([0.5, 1.025, 0.025])
    # A float32 mean of n = 4 float32 inputs (each within u of the decimal): n + 2 roundings.
    assert_within(alpha, exact, gamma_n(w.shape[0] + 2) * exact, "alpha")
    wb = np.asarray(weight_binarize(jnp.asarray(w)))
    # alpha: a float32 mean of 4 terms (sum, then one division) on each side, gamma_n(5) each
    exact = np.abs(w.astype(np.float64)).mean(axis=0)
    assert_within(wb, exact[None, :] * np.where(w >= 0, 1.0, -1.0), gamma_n(5) * exact[None, :], "W_b")
    assert wb[2, 0] == pytest.approx(alpha[0])  # sign(0) = +1
    np.testing.assert_array_equal(weight_binarize(jnp.asarray(w), scale=False), np.where(w >= 0, 1.0, -1.0))


def test_weight_binarize_gradient_is_alpha_times_clipped_ste():
    w = _kernel()
    up = np.arange(1, w.size + 1, dtype=np.float32).reshape(w.shape) / 7.0
    g = np.asarray(_vjp(weight_binarize, jnp.asarray(w), jnp.asarray(up)))
    exact_alpha = np.abs(w.astype(np.float64)).mean(axis=0)
    expected = exact_alpha[None, :] * up * (np.abs(w) <= 1.0)  # alpha detached: no d alpha / dW term
    # alpha within gamma_n(5) (a mean of 4), then one multiply by up: gamma_n(6) relative
    assert_within(g, expected, gamma_n(6) * np.abs(expected), "dL/dW")
    assert g[0, 1] == 0 and g[2, 1] == 0 and g[3, 0] == 0  # |W| > 1: zero
    g_ns = np.asarray(_vjp(lambda z: weight_binarize(z, scale=False), jnp.asarray(w), jnp.asarray(up)))
    # no scale: the gradient is up times a 0/1 mask, exact in float32 (no rounding at all)
    np.testing.assert_array_equal(g_ns, up * (np.abs(w) <= 1.0))


C = 0.1
# below 0, inside (rounds to 0), exactly c/2 (half-to-even -> 0), inside (rounds to 1), at c, above c
P = np.array([-0.05, 0.02, 0.05, 0.07, 0.1, 0.3], np.float32)


def test_elastic_binarize_forward():
    q = np.asarray(elastic_binarize(jnp.asarray(P), jnp.float32(C)))
    # q = c * {0, 1}: exact (p / c is one IEEE division, the same on every x86-64 CPU; no sums)
    np.testing.assert_array_equal(q, np.array([0.0, 0.0, 0.0, C, C, C], np.float32))
    assert set(np.round(q / C, 6)) <= {0.0, 1.0}


def test_elastic_binarize_gradients():
    up = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
    gp, gc = jax.grad(lambda p, c: jnp.sum(up * elastic_binarize(p, c)), argnums=(0, 1))(jnp.asarray(P), jnp.float32(C))
    r = P / np.float32(C)  # float32, as the binarizer computes it (0.1f / 0.1f == 1 exactly)
    inside = (r >= 0) & (r <= 1)
    # d q / d p: straight-through inside [0, c], 0 outside
    np.testing.assert_allclose(np.asarray(gp), up * inside, rtol=0, atol=0)
    # d q / d c (LSQ): round(r) - r inside, 1 above c, 0 below 0
    dq_dc = np.where(inside, np.round(r) - r, np.where(r > 1, 1.0, 0.0))
    assert dq_dc[0] == 0.0  # below
    assert dq_dc[1] == pytest.approx(-0.2) and dq_dc[3] == pytest.approx(0.3)  # inside
    assert dq_dc[5] == 1.0  # above
    # float32 sum of 6 products (each product of float32 values, one rounding): gamma_n(7) * sum |terms|
    assert abs(float(gc) - float(np.sum(up.astype(np.float64) * dq_dc))) <= gamma_n(7) * float(
        np.sum(np.abs(up * dq_dc))
    )
    assert np.shape(gc) == ()


def test_elastic_binarize_c_gradient_by_piece():
    """Each piece alone, so a wrong piece cannot hide in the sum."""
    for p, expected in [(-0.05, 0.0), (0.02, -0.2), (0.07, 0.3), (0.3, 1.0)]:
        gc = jax.grad(lambda c, p=p: elastic_binarize(jnp.float32(p), c))(jnp.float32(C))
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
    alpha = np.asarray(channel_alpha(w))  # (1, out), as export computes it
    y = np.asarray(jax.jit(binary_matmul, static_argnums=2)(x, w, True))
    np.testing.assert_array_equal(y, ints.astype(np.float32) * alpha)  # one float32 rounding per element
    np.testing.assert_array_equal(np.asarray(binary_matmul(x, w, False)), ints.astype(np.float32))
    # The same values as the unfused product, to float rounding: x @ W_b sums n_in terms +-alpha_j
    # (|sum of terms| = n_in * alpha_j), within gamma_n(n_in) * n_in * alpha_j of the exact integer * alpha_j;
    # the fused y has one rounding, u * |y|; W_b = alpha * sign(W) itself is exact (a sign flip).
    bound = gamma_n(n_in) * n_in * alpha + U32 * np.abs(y)
    assert_within(np.asarray(x @ weight_binarize(w)), y, bound, "unfused x @ W_b")


@pytest.mark.parametrize("scale", [True, False])
def test_binary_matmul_gradients_equal_unfused(scale):
    """The gradients are those of ``x @ weight_binarize(W)``: alpha detached, clipped STE on W."""
    kx, kw, kg = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (20, 33))  # any x: the rule does not assume +-1 inputs
    w = 0.7 * jax.random.normal(kw, (33, 9))  # some |W| > 1: zero gradient there
    up = jax.random.normal(kg, (20, 9))
    fused = jax.grad(lambda x, w: jnp.sum(up * binary_matmul(x, w, scale)), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(up * (x @ weight_binarize(w, scale=scale))), argnums=(0, 1))(x, w)
    xn, wn, gn = (np.asarray(a, np.float64) for a in (x, w, up))
    alpha = np.asarray(channel_alpha(w), np.float64) if scale else np.ones((1, wn.shape[1]))
    wb = alpha * np.where(wn >= 0, 1.0, -1.0)  # exact in float32 too (alpha times +-1)
    inside = np.abs(wn) <= 1
    # dL/dx = up @ W_b^T: 9 products summed (+ the products' roundings); each of the two float32
    # results is within gamma_n(9 + 1) * (|up| @ |W_b|^T) of the exact value, so they are within twice that.
    bound_x = 2 * gamma_n(wn.shape[1] + 1) * (np.abs(gn) @ np.abs(wb).T)
    # dL/dW = alpha * (x^T @ up) * 1{|W| <= 1}: 20 products summed, then one multiply by alpha.
    bound_w = 2 * gamma_n(xn.shape[0] + 2) * alpha * (np.abs(xn).T @ np.abs(gn)) * inside
    exact_x, exact_w = gn @ wb.T, alpha * (xn.T @ gn) * inside  # float64: exact to ~1e-16
    assert_within(fused[0], plain[0], bound_x, "dL/dx fused vs unfused")
    assert_within(fused[1], plain[1], bound_w, "dL/dW fused vs unfused")
    assert_within(fused[0], exact_x, bound_x / 2, "dL/dx vs exact")
    assert_within(fused[1], exact_w, bound_w / 2, "dL/dW vs exact")
    assert np.all(np.asarray(fused[1])[~inside] == 0)


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
    # unfused: sums of n terms in {0, +-c} (|sum of terms| = c * #level-ones in the row), so within
    # gamma_n(n) * c * rowcount of the exact value; the fused out has one rounding, u * |out|.
    n = level.shape[-1]
    bound = gamma_n(n) * float(c) * level.sum(axis=-1, keepdims=True) + U32 * np.abs(out)
    assert_within(np.asarray(elastic_binarize(p, c) @ v), out, bound, "unfused P_b @ V")


def test_elastic_matmul_gradients_equal_unfused():
    """The gradients are those of ``elastic_binarize(P, c) @ V`` (STE for P, LSQ for c, plain for V)."""
    p, c, v, up = _attention_operands(n=37, d=12, seed=1)
    v = v * 0.5 + 0.1  # any V: the rule does not assume +-1 values
    fused = jax.grad(lambda p, c, v: jnp.sum(up * elastic_matmul(p, c, v)), argnums=(0, 1, 2))(p, c, v)
    plain = jax.grad(lambda p, c, v: jnp.sum(up * (elastic_binarize(p, c) @ v)), argnums=(0, 1, 2))(p, c, v)
    assert np.shape(fused[1]) == ()
    # Both compute r = P / c with the same float32 division, so the level and the masks agree exactly.
    r = np.asarray(p) / np.float32(c)
    inside = (r >= 0) & (r <= 1)
    q = float(c) * np.clip(np.round(r), 0, 1).astype(np.float64)
    gn, vn = np.asarray(up, np.float64), np.asarray(v, np.float64)
    d = vn.shape[-1]
    # dL/dQ = up @ V^T: d products summed; each result within gamma_n(d + 1) * (|up| @ |V|^T), dL/dP masks it.
    err_dq = gamma_n(d + 1) * np.einsum("...qd,...kd->...qk", np.abs(gn), np.abs(vn))
    assert_within(fused[0], plain[0], 2 * err_dq * inside, "dL/dP")
    # dL/dV = Q^T @ up: N products summed.
    bound_v = 2 * gamma_n(q.shape[-2] + 1) * np.einsum("...qk,...qd->...kd", q, np.abs(gn))
    assert_within(fused[2], plain[2], bound_v, "dL/dV")
    # dL/dc = sum dL/dQ * t, t = round(r) - r | 1 | 0 (identical in both): M = P.size products summed,
    # so each within gamma_n(M + 1) * sum |dL/dQ * t| + sum |t| * err_dq of the exact value.
    t = np.where(inside, np.round(r) - r, np.where(r > 1, 1.0, 0.0)).astype(np.float64)
    dq = np.einsum("...qd,...kd->...qk", gn, vn)
    bound_c = 2 * (gamma_n(t.size + 1) * np.sum(np.abs(dq * t)) + np.sum(np.abs(t) * err_dq))
    assert_within(fused[1], plain[1], bound_c, "dL/dc")


# --------------------------------------------------------------------------
# The level c of the {0, c} binarizer: positive by construction; LSQ gradient scale.
# --------------------------------------------------------------------------


def test_positive_level_is_positive_and_finite_for_any_raw_value():
    raw = jnp.array([-3.4e38, -1e30, -1e6, -200.0, -20.0, 0.0, 20.0, 1e6, 1e30, 3.4e38], jnp.float32)
    c = np.asarray(positive_level(raw))
    assert c.dtype == np.float32
    assert np.all(c > 0) and np.all(np.isfinite(c))
    assert np.all(c[:4] == np.float32(LEVEL_MIN))  # softplus underflows to 0: the floor remains
    assert np.all(np.diff(c) >= 0)  # monotone
    g = np.asarray(jax.vmap(jax.grad(positive_level))(raw))  # dc/draw = sigmoid(raw) in [0, 1]
    assert np.all(np.isfinite(g)) and np.all((g >= 0) & (g <= 1))


@pytest.mark.parametrize("c", [1 / 197, 1 / 17, 0.1, 0.5, 3.0, 50.0])
def test_positive_level_inverse_round_trip(c):
    raw = positive_level_inverse(c)
    # raw is rounded to float32 (relative u), softplus' slope sigmoid(raw) <= 1 and c >= softplus(raw),
    # so that costs at most u * |raw| in c; softplus and the floor add a few roundings (gamma_n(4) * c).
    back = float(positive_level(jnp.float32(raw)))
    assert abs(back - c) <= U32 * abs(raw) + gamma_n(4) * c


@pytest.mark.parametrize("c", [0.0, -0.1, LEVEL_MIN, float("nan"), float("inf")])
def test_positive_level_inverse_refuses_unreachable_levels(c):
    with pytest.raises(ValueError, match="attention level"):
        positive_level_inverse(c)


def test_scale_grad_is_exact_identity_with_scaled_gradient():
    x = jax.random.normal(jax.random.key(3), (5,))
    up = jnp.arange(1.0, 6.0)
    np.testing.assert_array_equal(scale_grad(x, 0.37), x)
    g = jax.grad(lambda x: jnp.sum(up * scale_grad(x, 0.125)))(x)
    np.testing.assert_array_equal(g, 0.125 * up)  # a power of two: exact
    assert lsq_grad_scale(3 * 17 * 17) == pytest.approx(1 / np.sqrt(3 * 17 * 17))
    assert lsq_grad_scale(100, 4) == pytest.approx(1 / 20)


# ----------------------------------------------------------------------------- what the backward keeps (bf16 memory)
def saved_residuals(f, *args, capsys) -> list[str]:
    """The residuals ``jax.ad_checkpoint.print_saved_residuals`` reports for ``f(*args)``, one per line."""
    capsys.readouterr()
    print_saved_residuals(f, *args)
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_ste_sign_saves_a_boolean_mask_not_its_input(capsys):
    """The clipped STE's backward needs ``1{|x| <= 1}`` only: one bool per value, not the float input."""
    x = jnp.asarray(X, jnp.bfloat16)
    res = saved_residuals(ste_sign, x, capsys=capsys)
    assert len(res) == 1 and res[0].startswith(f"bool[{X.size}]"), res
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(ste_sign(x)))(x), (np.abs(X) <= 1).astype(np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_elastic_matmul_after_softmax_keeps_no_attention_sized_array_of_its_own(capsys, dtype):
    """``elastic_matmul(softmax(S), c, V)`` saves no more (B, H, N, N) arrays than the fp ``softmax(S) @ V``.

    The softmax keeps ``exp(S)``; the fp product keeps ``P`` for ``dL/dV``, the
    {0, c} product ``P / c`` in its place (the level and the ``c`` gradient
    follow from it). One more saved (B, H, N, N) array would add a float32
    copy per attention layer and image.
    """
    rng = np.random.default_rng(0)
    b, h, n, d = 2, 3, 7, 4
    s = jnp.asarray(rng.normal(size=(b, h, n, n)), jnp.float32)
    v = jnp.asarray(rng.choice([-1.0, 1.0], size=(b, h, n, d)), dtype)
    c = jnp.float32(1.0 / n)
    square = f"[{b},{h},{n},{n}]"

    def elastic(s, c, v):
        return elastic_matmul(jax.nn.softmax(s, axis=-1), c, v)

    def fp(s, v):
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)

    n_elastic = sum(square in r for r in saved_residuals(elastic, s, c, v, capsys=capsys))
    n_fp = sum(square in r for r in saved_residuals(fp, s, v, capsys=capsys))
    assert n_elastic <= n_fp, (n_elastic, n_fp)


def test_binary_matmul_weight_gradient_accumulates_in_float32_under_bfloat16():
    """``dL/dW = alpha * (x^T @ g) * 1{|W| <= 1}`` with bfloat16 ``x``, ``g``: the sum is float32, not bfloat16.

    Products of two bfloat16 values (8-bit significands) are exact in float32
    (24 bits), so the float32 sum over the ``M`` rows is within
    ``gamma_n(M) * sum |x g|`` of the exact one, and ``* alpha`` rounds once
    more (``gamma_n(M + 1)`` in all; ``* mask`` is exact); a sum rounded to
    bfloat16 (``u = 2^-9``) would miss that bound.
    """
    rng = np.random.default_rng(1)
    m, k, n = 512, 16, 8
    x = jnp.asarray(rng.choice([-1.0, 1.0], size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(scale=0.7, size=(k, n)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
    dw = jax.vjp(lambda w: binary_matmul(x, w), w)[1](g)[0]
    assert dw.dtype == jnp.float32
    x64, g64, w64 = (np.asarray(a, np.float64) for a in (x, g, w))
    alpha = np.mean(np.abs(np.asarray(w, np.float32)), axis=0, keepdims=True).astype(np.float64)
    exact = alpha * (x64.T @ g64) * (np.abs(w64) <= 1)
    bound = gamma_n(m + 1) * alpha * (np.abs(x64).T @ np.abs(g64))
    assert_within(dw, exact, bound, "dW")
