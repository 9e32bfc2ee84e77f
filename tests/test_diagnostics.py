"""Diagnostics (:mod:`bvit_jax.train.diagnostics`): flip rate, weight and activation metrics under jit,
the activation metrics against their formula, the oscillation EMA.

Float comparisons of the EMA use bounds derived from float32 arithmetic (``gamma_n``,
``tests/tolerances.py``), so they hold whatever order XLA sums in.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bvit_jax.nn.models import create
from bvit_jax.nn.param_groups import latent_weight_mask
from bvit_jax.train import diagnostics as D
from tests.tolerances import assert_within, gamma_n
from tests.train_helpers import nano_batch


def _params_and_mask(preset="binaryvit"):
    model = create("vit_nano", preset)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return model, params, latent_weight_mask(model, params)


def test_flip_rate_under_jit():
    model, params, mask = _params_and_mask()
    fr = jax.jit(lambda a, b: D.flip_rate(a, b, mask))
    same = fr(params, params)
    neg = fr(params, jax.tree.map(lambda w: -w, params))
    n_layers = 2 * 6
    assert sum(k.endswith("/kernel") for k in same) == n_layers
    assert all(float(v) == 0.0 for v in same.values())
    assert all(float(v) == 1.0 for v in neg.values())
    # a mask passed as a traced argument is refused with a clear message
    with pytest.raises(TypeError, match="static"):
        jax.jit(D.flip_rate)(params, params, mask)


def test_weight_metrics_under_jit():
    model, params, mask = _params_and_mask()
    m = jax.jit(lambda a, b: D.weight_metrics(a, b, mask))(params, params)
    for k in ("flip_rate/mean", "near_zero/all", "bimodality/mean"):
        assert np.isfinite(float(m[k]))
    # truncated-normal init: unimodal, well below the uniform's 5/9
    assert float(m["bimodality/mean"]) < 0.45
    assert 0.05 < float(m["near_zero/all"]) < 0.4


def test_activation_metrics_under_jit():
    model = create("vit_nano", "binaryvit")
    x, _ = nano_batch(2)
    _, inter = model(x, capture=True)
    m = jax.jit(D.activation_metrics)(inter)
    ent = {k: float(v) for k, v in m.items() if k.startswith("act_entropy/")}
    assert len(ent) == len(inter) + 1
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in ent.values())
    share = [float(v) for k, v in m.items() if k.startswith("act_pos_share/")]
    assert all(0.0 <= v <= 1.0 for v in share)
    assert all(np.isfinite(float(v)) for v in m.values())
    # capture inside jit (how the trainer calls it), same numbers
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def diag(p, images):
        return D.activation_metrics(nnx.merge(graphdef, p)(images, capture=True)[1])

    mj = diag(params, x)
    assert set(mj) == set(m)
    for k in m:
        np.testing.assert_allclose(mj[k], m[k], rtol=1e-4, atol=1e-5)


def test_activation_metrics_against_formula():
    s = np.array([[[1.0, -2.0], [3.0, 0.0], [-1.0, 4.0], [2.0, 1.0]]], np.float32)  # (1, 4 tokens, 2 channels)
    x = s + np.array([0.5, -0.5], np.float32)
    m = D.activation_metrics({"l": {"x": jnp.asarray(x), "shifted": jnp.asarray(s)}})
    p = np.array([3 / 4, 3 / 4])  # shares of s >= 0 per channel (0 counts as +1)
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert float(m["act_entropy/l"]) == pytest.approx(h.mean(), rel=1e-6)
    assert float(m["act_pos_share/l"]) == pytest.approx(6 / 8)
    alpha = np.abs(s).mean(axis=(0, 1))
    approx = alpha * np.where(s >= 0, 1.0, -1.0)
    assert float(m["act_rel_error/l"]) == pytest.approx(np.linalg.norm(x - approx) / np.linalg.norm(x), rel=1e-5)
    assert float(m["act_bin_error/l"]) == pytest.approx(np.linalg.norm(s - approx) / np.linalg.norm(s), rel=1e-5)
    assert float(D.binary_entropy(jnp.float32(0.5))) == pytest.approx(1.0)
    assert float(D.binary_entropy(jnp.float32(0.0))) == 0.0


def test_oscillation_ema():
    mask = {"w": True}
    seq = [
        np.array([1.0, 1.0, -1.0]),
        np.array([-1.0, 1.0, -1.0]),  # w0 flips (first flip: no oscillation)
        np.array([1.0, 1.0, 0.0]),  # w0 flips back: oscillation; w2 flips to +1 (sign(0) = +1), first flip
        np.array([-1.0, 1.0, 0.5]),  # w0 oscillates again; w2 stays
    ]
    m = 0.1
    upd = jax.jit(lambda st, p: D.oscillation_update(st, p, mask, momentum=m, threshold=0.05))
    state = D.oscillation_init({"w": jnp.asarray(seq[0])}, mask)
    osc = [[0, 0, 0], [1, 0, 0], [1, 0, 0]]
    f = np.zeros(3)
    for t, (w, o) in enumerate(zip(seq[1:], osc), start=1):
        state, metrics = upd(state, {"w": jnp.asarray(w)})
        f = (1 - m) * f + m * np.asarray(o, float)
        # Float32 EMA vs the float64 one: each update rounds m, 1 - m, two products and a sum of
        # values in [0, 1] (<= 5u absolute) and shrinks the earlier error by 1 - m < 1, so after
        # t updates |error| <= gamma_{5t}; the mean over 3 adds a sum and a division.
        assert_within(state.freq["w"], f, gamma_n(5 * t), "EMA")
        assert_within(metrics["osc_freq/w"], f.mean(), gamma_n(5 * t) + gamma_n(3), "mean EMA")
        assert float(metrics["osc_share/w"]) == pytest.approx(np.mean(f > 0.05))
    np.testing.assert_array_equal(state.last_flip["w"], [-1, 0, 1])
    np.testing.assert_array_equal(state.last_sign["w"], [-1, 1, 1])


def test_never_flipped_counts_from_its_start_and_silent_is_the_flip_ema_below_its_threshold():
    """w0 flips before the count starts (never-flipped still counts it as unmoved), w1 flips after it,
    w2 never: never_flipped = 2/3 then 1/3. The flip EMA of a weight that flipped once is
    m_s (1 - m_s)^k, below 1e-4 only after ~2,300 more checks, so once w1 has flipped it is not silent."""
    mask = {"w": True}
    seq = [
        np.array([1.0, 1.0, 1.0]),
        np.array([-1.0, 1.0, 1.0]),  # check 1: w0 flips (not counted yet)
        np.array([-1.0, 1.0, 1.0]),  # check 2: nothing
        np.array([-1.0, -0.5, 1.0]),  # check 3: w1 flips (counted)
    ]
    counting = [False, False, True]
    upd = jax.jit(lambda st, p, c: D.oscillation_update(st, p, mask, count_flips=c))
    state = D.oscillation_init({"w": jnp.asarray(seq[0])}, mask)
    never, silent = [], []
    for w, c in zip(seq[1:], counting):
        state, metrics = upd(state, {"w": jnp.asarray(w)}, jnp.asarray(c))
        never.append(float(metrics["never_flipped/w"]))
        silent.append(float(metrics["silent/w"]))
    np.testing.assert_array_equal(state.flipped_since["w"], [False, True, False])
    assert never == pytest.approx([1.0, 1.0, 2 / 3], abs=1e-7)  # shares of 3 (one rounding of k/3)
    m = D.SILENT_MOMENTUM
    # the EMA of [1, 0, 0] for w0, [0, 0, 1] for w1: each check rounds two products and a sum (3u relative)
    want = np.array([m * (1 - m) ** 2, m, 0.0])
    assert_within(state.flip_ema["w"], want, gamma_n(9) * want, "flip EMA")
    # w0 is silent at no check after its flip (m (1 - m)^2 > 1e-4), w2 at every check, w1 until it flips
    assert silent == pytest.approx([2 / 3, 2 / 3, 1 / 3], abs=1e-7)


def test_outside_ste_window_share_counts_weights_past_1_per_layer_and_pooled():
    """``outside_window``: the share of latent weights with |W| > 1 (no straight-through gradient there), exactly
    (counts of at most a few thousand weights are exact in float32); |W| = 1 is inside (the window is closed)."""
    _, params, mask = _params_and_mask()
    paths = [p for p, m in D.latent_weights(params, mask).items()]
    first = paths[0]
    w = params
    for key in first.split("/")[:-1]:
        w = w[int(key) if key.isdigit() else key]
    name = first.split("/")[-1]
    kernel = np.asarray(w[name]).copy()
    flat_k = kernel.reshape(-1)
    flat_k[:5] = [1.5, -2.0, 1.0, -1.0, 1.0000001]  # 3 outside, the two exact +-1 inside
    w[name] = jnp.asarray(kernel)
    m = jax.jit(lambda p: D.outside_ste_window_share(p, mask))(params)
    assert float(m[f"outside_window/{first}"]) == 3 / kernel.size
    for p in paths[1:]:  # trunc-normal init (std 0.02): every other weight is inside
        assert float(m[f"outside_window/{p}"]) == 0.0
    total = sum(v.size for v in D.latent_weights(params, mask).values())
    assert float(m["outside_window/all"]) == pytest.approx(3 / total, rel=1e-6)
