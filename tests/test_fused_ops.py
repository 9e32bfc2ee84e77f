"""The fused ops' hand-written backward passes against autodiff of their textbook formulas.

References are computed in float64; every bound is the first-order float32
error of the arithmetic (``tests/tolerances.py``: ``gamma_n(n)`` for a sum of
``n`` terms in any order), so it holds on any x86-64 CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bvit_jax.nn.fused_ops import layer_norm, rprelu
from tests.tolerances import U32, assert_within, gamma_n


def _plain_layer_norm(x, scale, bias, eps=1e-6):
    """The textbook formula (two-pass variance), differentiated by autodiff."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def test_layer_norm_backward_equals_autodiff_of_the_formula():
    b, t, d = 3, 7, 48
    kx, ks, kb, kg = jax.random.split(jax.random.key(11), 4)
    x = 1.5 * jax.random.normal(kx, (b, t, d)) + 0.5 * jnp.arange(b * t).reshape(b, t, 1) / (b * t)
    scale = 1.0 + 0.3 * jax.random.normal(ks, (d,))
    bias = 0.2 * jax.random.normal(kb, (d,))
    g = jax.random.normal(kg, (b, t, d))
    y, vjp = jax.vjp(lambda *a: layer_norm(*a, 1e-6), x, scale, bias)
    dx, ds, db = vjp(g)
    with jax.enable_x64(True):  # the reference in float64: its own error (~1e-16) is negligible here
        args64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, scale, bias)]
        y64, vjp64 = jax.vjp(_plain_layer_norm, *args64)
        ref = [np.asarray(a) for a in vjp64(jnp.asarray(np.asarray(g), jnp.float64))]
        y64 = np.asarray(y64)

    # First-order float32 error bound of the closed form (module layers: fast variance E[x^2] - E[x]^2,
    # r = 1/sqrt(var + eps), xhat = (x - mean) r, dx = r (g s - mean(g s) - xhat mean(g s xhat))).
    xn, s, gn = np.asarray(x, np.float64), np.asarray(scale, np.float64), np.asarray(g, np.float64)
    mean = xn.mean(-1, keepdims=True)
    var = ((xn - mean) ** 2).mean(-1, keepdims=True)
    r = 1 / np.sqrt(var + 1e-6)
    xhat = (xn - mean) * r
    a_gs = np.abs(gn * s)
    m_a, m_b = a_gs.mean(-1, keepdims=True), (a_gs * np.abs(xhat)).mean(-1, keepdims=True)
    # var from E[x^2] - E[x]^2 (sums of d terms) cancels: relative error amplified by kappa
    kappa = ((xn**2).mean(-1, keepdims=True) + mean**2) / (var + 1e-6)
    eps_r = gamma_n(d + 3) * kappa / 2 + gamma_n(3)  # relative error of r (rsqrt: a few roundings)
    d_mean = gamma_n(d + 1) * np.abs(xn).mean(-1, keepdims=True)
    d_xhat = np.abs(xhat) * (eps_r + gamma_n(2)) + r * d_mean
    d_m1 = gamma_n(d + 2) * m_a  # mean(g s)
    d_m2 = gamma_n(d + 3) * m_b + (a_gs * d_xhat).mean(-1, keepdims=True)  # mean(g s xhat)
    t_abs = a_gs + m_a + np.abs(xhat) * m_b
    d_t = gamma_n(4) * t_abs + d_m1 + d_xhat * m_b + np.abs(xhat) * d_m2
    bound_dx = r * d_t + (eps_r + U32) * r * t_abs
    rows = (0, 1)
    n_rows = b * t
    bound_ds = gamma_n(n_rows + 1) * np.sum(np.abs(gn * xhat), rows) + np.sum(np.abs(gn) * d_xhat, rows)
    bound_db = gamma_n(n_rows) * np.sum(np.abs(gn), rows)
    assert_within(dx, ref[0], bound_dx, "d x")
    assert_within(ds, ref[1], bound_ds, "d scale")
    assert_within(db, ref[2], bound_db, "d bias")
    # and the forward: |y - y64| <= |s| d_xhat + roundings of the scale and the bias
    assert_within(y, y64, np.abs(s) * d_xhat + gamma_n(2) * (np.abs(s * xhat) + np.abs(np.asarray(bias))), "y")
    # not vacuous: the bounds are far below the values they guard
    assert np.max(bound_dx / (np.abs(ref[0]) + np.abs(ref[0]).mean())) < 1e-4


def test_layer_norm_module_backward_equals_autodiff():
    """The module's fast path (bvit_jax.nn.norms.LayerNorm) gives the formula's parameter gradients."""
    from bvit_jax.nn.norms import LayerNorm

    ln = LayerNorm(16, epsilon=1e-6, rngs=nnx.Rngs(0))
    ln.scale[...] = 1 + 0.1 * jax.random.normal(jax.random.key(1), (16,))
    x = jax.random.normal(jax.random.key(2), (4, 5, 16))
    g = jax.random.normal(jax.random.key(3), (4, 5, 16))
    grads = nnx.grad(lambda m: jnp.sum(g * m(x)))(ln)
    plain = jax.grad(lambda s, b: jnp.sum(g * _plain_layer_norm(x, s, b)), argnums=(0, 1))(ln.scale[...], ln.bias[...])
    # d scale / d bias: sums over 20 rows of g xhat / g; the xhat of both within ~gamma(d + 10) relative
    gn, xn = np.asarray(g, np.float64), np.asarray(x, np.float64)
    xhat = np.abs((xn - xn.mean(-1, keepdims=True)) / xn.std(-1, keepdims=True))
    assert_within(
        grads["scale"][...], plain[0], 2 * gamma_n(20 + 16 + 10) * np.sum(np.abs(gn) * (xhat + 1), (0, 1)), "scale"
    )
    assert_within(grads["bias"][...], plain[1], 2 * gamma_n(20) * np.sum(np.abs(gn), (0, 1)), "bias")


def test_rprelu_backward_equals_autodiff_of_the_formula():
    d = 6
    gam = jnp.array([0.0, 0.5, -0.5, 1.0, 0.2, -1.0])
    zeta = jnp.array([0.1, -0.2, 0.0, 0.3, 0.0, 1.0])
    slope = jnp.array([0.25, 0.1, 0.5, 0.0, -0.3, 1.0])
    x = jax.random.normal(jax.random.key(9), (4, 9, d))
    x = x.at[0, 0, 1].set(0.5)  # z = 0 exactly: the z >= 0 piece, slope 1, in both
    g = jax.random.normal(jax.random.key(10), (4, 9, d))
    _, vjp = jax.vjp(rprelu, x, gam, zeta, slope)
    got = vjp(g)

    def plain(x, gam, zeta, slope):
        z = x - gam
        return jnp.where(z >= 0, z, slope * z) + zeta

    with jax.enable_x64(True):  # float64 reference
        a64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, gam, zeta, slope)]
        _, vjp64 = jax.vjp(plain, *a64)
        ref = [np.asarray(a) for a in vjp64(jnp.asarray(np.asarray(g), jnp.float64))]
    # z = fl(x - gamma) has the sign of x - gamma (exact for the comparison), so the pieces agree.
    gn = np.asarray(g, np.float64)
    z = np.asarray(x, np.float64) - np.asarray(gam, np.float64)
    dxn = np.where(z >= 0, gn, np.asarray(slope, np.float64) * gn)
    n = gn.shape[0] * gn.shape[1]
    rows = (0, 1)
    assert_within(got[0], ref[0], U32 * np.abs(dxn), "d x")  # one multiply
    assert_within(got[1], ref[1], gamma_n(n + 1) * np.sum(np.abs(dxn), rows), "d gamma")  # - sum of d x
    assert_within(got[2], ref[2], gamma_n(n) * np.sum(np.abs(gn), rows), "d zeta")
    # d slope = sum over z < 0 of g * fl(z): z, the product, then n terms summed
    assert_within(got[3], ref[3], gamma_n(n + 2) * np.sum(np.abs(gn * np.minimum(z, 0)), rows), "d slope")
    assert all(np.any(np.asarray(a) != 0) for a in got)
