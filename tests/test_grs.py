"""GRS: the transformed gradient, its penalty, its schedule, its effect on weights; iterative freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bvit_jax.train import diagnostics
from bvit_jax.train.grs import freeze_oscillating, frozen_share, grs, grs_penalty
from tests.tolerances import U32, assert_within, gamma_n


def _params():
    w = np.array([[0.3, -0.05, 1.2], [-0.6, 0.0, -0.2], [0.1, 0.25, -0.4], [-0.9, -0.15, 0.05]], np.float32)
    return {"layer": {"kernel": jnp.asarray(w), "bias": jnp.asarray([0.1, -0.2, 0.3], jnp.float32)}}


MASK = {"layer": {"kernel": True, "bias": False}}


def _bound(w, g, lam):
    """Float32 error bound of ``g + lam * (|W| - alpha) sign(W)``: alpha is a mean of n inputs
    (n + 1 roundings), then a difference, a product and a sum, so every element is within
    ``gamma_{n+4} * (|g| + lam * (|W| + alpha))`` of the exact value."""
    w = np.abs(np.asarray(w, np.float64))
    return gamma_n(w.shape[0] + 4) * (np.abs(np.asarray(g, np.float64)) + lam * (w + w.mean(axis=0, keepdims=True)))


def _expected(w, g, lam):
    w = np.asarray(w, np.float64)
    alpha = np.abs(w).mean(axis=0, keepdims=True)  # per output channel
    return np.asarray(g) + lam * (np.abs(w) - alpha) * np.where(w >= 0, 1.0, -1.0)


def test_grs_update_formula_on_masked_leaves_only():
    params = _params()
    grads = {"layer": {"kernel": jnp.full((4, 3), 0.01), "bias": jnp.asarray([1.0, 2.0, 3.0])}}
    lam = 0.5
    tx = grs(lam, mask=MASK)
    upd, _ = tx.update(grads, tx.init(params), params)
    w, g = params["layer"]["kernel"], grads["layer"]["kernel"]
    assert_within(upd["layer"]["kernel"], _expected(w, g, lam), _bound(w, g, lam), "GRS update")
    np.testing.assert_array_equal(upd["layer"]["bias"], grads["layer"]["bias"])
    # sign(0) = +1: the zero weight gets (0 - alpha) * (+1)
    alpha1 = np.abs(np.asarray(params["layer"]["kernel"])[:, 1]).mean()
    assert_within(upd["layer"]["kernel"][1, 1], 0.01 - lam * alpha1, _bound(w, g, lam)[1, 1], "sign(0)")


def test_grs_equals_gradient_of_penalty():
    params = _params()
    lam = 0.3
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = grs(lam, mask=MASK)
    w = params["layer"]["kernel"] + 1e-3  # move off the 0 kink of |W| (penalty is not differentiable there)
    params_shift = {"layer": {"kernel": w, "bias": params["layer"]["bias"]}}
    upd, _ = tx.update(zeros, tx.init(params_shift), params_shift)
    auto = jax.grad(lambda k: lam * grs_penalty(k))(w)
    # Autodiff also carries the alpha term -sign(W)/n * sum_j (|W_j| - alpha), zero exactly but a
    # float32 residue of <= gamma_{2n}(sum |W_j| + n alpha) / n = 2 alpha gamma_{2n}; with both
    # sides' own roundings (alpha: n + 1, then <= 4 more), |difference| <= lam gamma_{4n+8} (|W| + alpha).
    n = w.shape[0]
    a = np.abs(np.asarray(w, np.float64))
    bound = lam * gamma_n(4 * n + 8) * (a + a.mean(axis=0, keepdims=True))
    assert_within(upd["layer"]["kernel"], auto, bound, "GRS vs grad of the penalty")


def test_grs_schedule_is_used():
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    sched = optax.linear_schedule(0.0, 1.0, transition_steps=4)
    tx = grs(sched, mask=MASK)
    state = tx.init(params)
    w = params["layer"]["kernel"]
    for step in range(6):
        upd, state = tx.update(zeros, state, params)
        lam = float(sched(step))
        zero = np.zeros((4, 3))
        assert_within(upd["layer"]["kernel"], _expected(w, zero, lam), _bound(w, zero, lam), f"step {step}")
    # step 0 has lambda 0: nothing added
    upd0, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(upd0["layer"]["kernel"], 0.0)


def test_grs_negative_strength_raises():
    with pytest.raises(ValueError, match="strength"):
        grs(-1e-4)


def test_grs_needs_params():
    params = _params()
    tx = grs(0.1)
    with pytest.raises(ValueError, match="parameters"):
        tx.update(params, tx.init(params))


def test_grs_alone_makes_gaussian_weights_bimodal():
    key = jax.random.key(0)
    params = {
        "a": {"kernel": 0.02 * jax.random.normal(key, (64, 48))},
        "b": {"kernel": 0.05 * jax.random.normal(jax.random.fold_in(key, 1), (96, 32)), "bias": jnp.zeros(32)},
    }
    mask = {"a": {"kernel": True}, "b": {"kernel": True, "bias": False}}
    tx = optax.chain(grs(1.0, mask=mask), optax.sgd(0.1))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def step(p, s):
        upd, s = tx.update(zeros, s, p)
        return optax.apply_updates(p, upd), s

    near0 = diagnostics.near_zero_share(params, mask, frac=0.25)
    bim0 = diagnostics.bimodality(params, mask)
    p = params
    for _ in range(100):
        p, state = step(p, state)
    near1 = diagnostics.near_zero_share(p, mask, frac=0.25)
    bim1 = diagnostics.bimodality(p, mask)

    assert float(near0["near_zero/all"]) > 0.1  # Gaussian: ~16% within alpha/4
    assert float(near1["near_zero/all"]) <= float(near0["near_zero/all"]) / 10
    for k in ("a/kernel", "b/kernel"):
        assert float(bim0[f"bimodality/{k}"]) == pytest.approx(1 / 3, abs=0.05)  # Gaussian
        assert float(bim1[f"bimodality/{k}"]) > 5 / 9  # above the uniform's value: bimodal
        assert float(bim1[f"bimodality/{k}"]) > float(bim0[f"bimodality/{k}"]) + 0.3
    np.testing.assert_array_equal(p["b"]["bias"], params["b"]["bias"])  # unmasked untouched


# ----------------------------------------------------------------------------- iterative freezing
def _freeze_steps(m, threshold):
    """First t with f_t = 1 - m^t > threshold, for a weight flipping at every update (float64)."""
    t = 1
    while not 1 - m**t > threshold:
        t += 1
    # f is accumulated in float32 (about t roundings of size <= u each): the crossing must not be that close.
    assert min(abs(1 - m**t - threshold), abs(1 - m ** (t - 1) - threshold)) > 1e-4
    return t


@pytest.mark.parametrize("m, threshold", [(0.9, 0.6), (0.5, 0.9), (0.0, 0.5)])
def test_freezing_stops_a_weight_flipping_every_step_at_the_analytic_step_and_for_good(m, threshold):
    t_freeze = _freeze_steps(m, threshold)  # (0.9, 0.6) -> 9, (0.5, 0.9) -> 4, (0.0, 0.5) -> 1
    params = _params()
    w0 = np.asarray(params["layer"]["kernel"])
    tx = freeze_oscillating(threshold, m, mask=MASK)
    state = tx.init(params)

    def updates_for(p, t):
        w, b = p["layer"]["kernel"], p["layer"]["bias"]
        # [0, 0] is reflected (w -> -w: a flip at every update), later with a huge push towards
        # the other sign; the other kernel weights move away from 0 (never flip), by a lot.
        uw = 10.0 * jnp.where(w >= 0, 1.0, -1.0)
        flip = -2 * w[0, 0] if t <= t_freeze + 3 else -1e6 * jnp.sign(w[0, 0])
        uw = uw.at[0, 0].set(flip)
        return {"layer": {"kernel": uw, "bias": -2 * b}}  # the bias flips every update: not masked

    p = params
    history = [float(w0[0, 0])]
    for t in range(1, t_freeze + 10):
        upd, state = tx.update(updates_for(p, t), state, p)
        p = optax.apply_updates(p, upd)
        history.append(float(p["layer"]["kernel"][0, 0]))
        frozen = np.asarray(state.inner_state.frozen["layer"]["kernel"])
        if t < t_freeze:
            assert not frozen.any(), t
            f = float(state.inner_state.flip_freq["layer"]["kernel"][0, 0])
            assert f == pytest.approx(1 - m**t, abs=t * 4 * U32), t
            assert float(frozen_share(state)) == 0.0
        else:
            assert frozen[0, 0] and frozen.sum() == 1, t  # only the oscillating weight
            assert float(frozen_share(state)) == pytest.approx(1 / 12)  # of the 12 masked weights
        # the non-latent bias is never frozen: it keeps flipping
        np.testing.assert_array_equal(p["layer"]["bias"], np.asarray(params["layer"]["bias"]) * (-1) ** t)
    # moves (flips) at updates 1 .. t_freeze - 1, then never again
    expected = [w0[0, 0] * (-1) ** min(t, t_freeze - 1) for t in range(t_freeze + 10)]
    np.testing.assert_array_equal(np.float32(history), np.float32(expected))
    # the weights that never flip were never frozen and moved at every update
    others = np.ones((4, 3), bool)
    others[0, 0] = False
    np.testing.assert_allclose(
        np.abs(np.asarray(p["layer"]["kernel"]))[others], np.abs(w0)[others] + 10.0 * (t_freeze + 9), rtol=1e-5
    )


def test_freezing_needs_params_validates_its_arguments_and_is_found_in_a_chain():
    params = _params()
    tx = freeze_oscillating(0.1)
    with pytest.raises(ValueError, match="parameters"):
        tx.update(params, tx.init(params))
    for bad in (dict(threshold=1.0), dict(threshold=-0.1), dict(threshold=0.1, momentum=1.0)):
        with pytest.raises(ValueError, match="freeze"):
            freeze_oscillating(**bad)
    chain = optax.chain(grs(0.1, mask=MASK), optax.sgd(0.1))
    assert frozen_share(chain.init(params)) is None  # no freezing in the chain
    chain = optax.chain(optax.sgd(0.1), freeze_oscillating(0.5, 0.9, mask=MASK))
    assert float(frozen_share(chain.init(params))) == 0.0


# ----------------------------------------------------------------------------- ReBNN's adaptive strength
def test_adaptive_grs_is_rebnn_per_channel_rule_from_the_last_update_s_flips():
    """``lambda_i = s * clip(p_i * max_j |g_ij|, lo, hi)``, ``p_i`` the share of channel i's signs changed since
    the previous update: channel 0 has 2 of 4 flipped (clipped to hi), channel 1 one (inside the range),
    channel 2 none (the floor lo); at the first update nothing has flipped, so every channel is at lo."""
    from bvit_jax.train.grs import grs_adaptive

    lo, hi, s = 1e-3, 4e-2, 0.5
    params = _params()
    w0 = np.asarray(params["layer"]["kernel"])
    w1 = w0.copy()
    w1[0, 0], w1[1, 0] = -w0[0, 0], -w0[1, 0] + 0.01  # channel 0: 0.3 -> -0.3, -0.6 -> 0.61: two flips
    w1[1, 1] = -0.02  # channel 1: sign(0) = +1 -> -1: one flip; channel 2 unchanged
    g = np.array([[0.2, -0.01, 0.5], [-0.1, 0.08, 0.0], [0.05, 0.02, -0.3], [0.0, -0.04, 0.1]], np.float32)
    grads = {"layer": {"kernel": jnp.asarray(g), "bias": jnp.ones(3)}}
    tx = grs_adaptive(lo, hi, shape=s, mask=MASK)
    state = tx.init(params)
    upd, state = tx.update(grads, state, params)
    assert_within(upd["layer"]["kernel"], _expected(w0, g, s * lo), _bound(w0, g, s * lo), "first update: floor")
    np.testing.assert_array_equal(upd["layer"]["bias"], grads["layer"]["bias"])

    p1 = {"layer": {"kernel": jnp.asarray(w1), "bias": params["layer"]["bias"]}}
    upd, state = tx.update(grads, state, p1)
    p = np.array([2, 1, 0]) / 4
    lam = s * np.clip(p * np.abs(g).max(axis=0), lo, hi)  # [hi, 0.02, lo] times s
    np.testing.assert_allclose(lam / s, [hi, 0.02, lo])
    # one more rounding than _bound counts (the product p * max|g|): gamma_{n+5}
    bound = _bound(w1, g, lam) * gamma_n(w1.shape[0] + 5) / gamma_n(w1.shape[0] + 4)
    assert_within(upd["layer"]["kernel"], _expected(w1, g, lam), bound, "second update: per-channel lambda")

    # The state moved on to W1's signs: the same W1 again has no flips, so every channel is back at the floor.
    upd, _ = tx.update(grads, state, p1)
    assert_within(upd["layer"]["kernel"], _expected(w1, g, s * lo), _bound(w1, g, s * lo), "third update: floor")


def test_grs_schedule_lr_follows_the_learning_rate_s_shape():
    """``lambda_t = strength * lr_t / peak``: the warm-up's rise, ``strength`` at the peak, then the cosine decay."""
    import ml_collections

    from bvit_jax.train.optim import grs_schedule, learning_rate_schedule, peak_learning_rate

    o = ml_collections.ConfigDict(dict(base_lr=1e-3, lr_reference_batch=512, min_lr=1e-6))
    lr = learning_rate_schedule(o, total_steps=20, warmup_steps=4, global_batch_size=256)
    peak = peak_learning_rate(o, 256)
    lam = grs_schedule(2e-4, kind="lr", learning_rate=lr, peak_lr=peak)
    for t in range(20):
        want = 2e-4 * float(lr(t)) / peak
        # float32: strength and peak each rounded once, then a division and a product: 4 roundings
        assert float(lam(t)) == pytest.approx(want, rel=gamma_n(4), abs=0)
    # the peak at update W - 1, min_lr at the last one (lr_t itself rounded too: 5 roundings)
    assert float(lam(3)) == pytest.approx(2e-4, rel=gamma_n(5))
    assert float(lam(19)) == pytest.approx(2e-4 * 1e-6 / peak, rel=gamma_n(5))
    with pytest.raises(ValueError, match="no warm-up or ramp"):
        grs_schedule(2e-4, kind="lr", learning_rate=lr, peak_lr=peak, ramp_steps=5)
