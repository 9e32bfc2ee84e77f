"""Models: every preset compiles and trains on vit_nano; capture; errors; diagnostics under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bvit_jax import diagnostics as D
from bvit_jax.layers import SignActivation
from bvit_jax.models import PRESETS, config_overrides, create, override_fields
from bvit_jax.param_groups import latent_weight_mask
from tests.tolerances import assert_within, gamma_n

B = 4


def _batch(seed=0):
    x = jax.random.normal(jax.random.key(seed), (B, 16, 16, 3))
    y = jnp.arange(B) % 10
    return x, y


@nnx.jit
def _loss_and_grads(model, x, y):
    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    return nnx.value_and_grad(loss_fn)(model)


# Parameter leaves whose gradient is legitimately all zero, by preset: none. (Every Param of every
# preset -- kernels, biases, shifts beta/gamma, the attention level, the shortcut and block
# LayerNorms, RPReLU, tokens, position embedding, head -- lies on a path to the loss with a
# non-zero surrogate gradient on random images; a new exception must be listed here with its reason.)
ZERO_GRADIENT_OK: dict[str, set[str]] = {}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_compiles_and_every_parameter_gets_a_finite_nonzero_gradient(preset):
    model = create("vit_nano", preset)
    x, y = _batch()
    for images in (x, jnp.zeros_like(x)):
        loss, grads = _loss_and_grads(model, images, y)
        assert np.isfinite(float(loss))
        leaves = jax.tree.leaves(grads)
        assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # on real data every parameter leaf receives a gradient: a stop_gradient anywhere (the shifts,
    # the attention level, a shortcut LayerNorm, RPReLU, ...) leaves its leaves at exactly zero
    _, grads = _loss_and_grads(model, x, y)
    flat = {"/".join(str(k) for k in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    params = {"/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(flat) == params
    zero = {p for p, g in flat.items() if not np.any(g != 0)}
    assert zero == ZERO_GRADIENT_OK.get(preset, set()), sorted(zero)
    assert all(np.all(np.isfinite(g)) for g in flat.values())
    kinds = {p.rsplit("/", 1)[-1] for p in params}
    if preset != "fp":  # the binary additions are among the leaves checked
        assert {"beta", "attn_level_raw", "slope", "gamma", "zeta"} <= kinds
        assert any("/q/norm/" in p for p in params)


@pytest.mark.parametrize("preset", ["baseline", "binaryvit"])
def test_huge_optimizer_steps_keep_attention_levels_positive(preset):
    """SGD with lr 1e6 on the levels, driven by the training loss (both ways) and by the levels
    themselves: every c stays > 0 and the model's logits and gradients stay finite. (The other
    parameters are held still: such a step on them would overflow the logits whatever c is.)"""
    model = create("vit_nano", preset)
    x, y = _batch(3)
    graphdef, params = nnx.split(model, nnx.Param)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "level" if str(path[-2].key) == "attn_level_raw" else "rest", params
    )
    assert jax.tree.leaves(labels).count("level") == len(model.blocks)
    tx = optax.multi_transform({"level": optax.sgd(1e6), "rest": optax.set_to_zero()}, labels)
    state = tx.init(params)

    def levels(p):
        m = nnx.merge(graphdef, p)
        return jnp.stack([blk.attn.level() for blk in m.blocks])

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

    steps = [lambda p: jnp.sum(levels(p)), loss, lambda p: -loss(p), lambda p: -jnp.sum(levels(p)), loss]
    for objective in steps:
        grads = jax.grad(objective)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        c = np.asarray(levels(params))
        assert np.all(c > 0) and np.all(np.isfinite(c)), c
        assert bool(jnp.all(jnp.isfinite(nnx.merge(graphdef, params)(x))))
        g = jax.grad(loss)(params)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


def _sign_paths(model):
    return {"/".join(str(p) for p in path) for path, m in nnx.iter_modules(model) if isinstance(m, SignActivation)}


@pytest.mark.parametrize("preset", ["baseline", "binaryvit"])
def test_capture_returns_every_sign_input(preset):
    model = create("vit_nano", preset)
    x, _ = _batch(1)
    logits, inter = model(x, capture=True)
    expected = _sign_paths(model)
    assert len(expected) == 2 * (6 + 3)  # 6 binary linears + q/k/v signs per block
    assert set(inter) == expected
    n_tok = model.cfg.num_tokens
    for d in inter.values():
        assert set(d) == {"x", "shifted"}
        assert d["x"].shape == d["shifted"].shape
        assert d["x"].shape[:2] == (B, n_tok)
    np.testing.assert_allclose(logits, model(x), rtol=1e-5, atol=1e-5)  # capture does not change the output
    # no intermediates are left behind in the model
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


def test_asm_mode_is_a_config_override():
    """``config.model.overrides.asm_mode`` (a typed placeholder generated from ``BinaryOptions``) reaches
    every sign's shift; the default is today's form, and per_head reads the attention's heads."""
    from bvit_jax import recipes

    assert override_fields()["asm_mode"] is str
    overrides = recipes.model_overrides()
    assert "asm_mode" in overrides and overrides.asm_mode is None  # unset: the preset's value
    assert create("vit_nano", "binaryvit", **config_overrides(overrides)).opts.asm_mode == "token_mean"
    for mode in ("per_token", "per_head"):
        model = create("vit_nano", "binaryvit", **config_overrides(recipes.model_overrides(asm_mode=mode)))
        assert model.opts.asm_mode == mode
        signs = [m for _, m in nnx.iter_graph(model) if isinstance(m, SignActivation)]
        assert len(signs) == 9 * model.cfg.depth and all(s.shift.mode == mode for s in signs)
        attn = model.blocks[0].attn
        assert attn.q_sign.shift.heads == model.cfg.num_heads and attn.q.linear.act.shift.heads == 1
    with pytest.raises(ValueError, match="asm_mode"):
        create("vit_nano", "binaryvit", asm_mode="per_channel")


def test_fp_model_captures_nothing():
    model = create("vit_nano", "fp")
    _, inter = model(_batch()[0], capture=True)
    assert inter == {}
    with pytest.raises(ValueError, match="no captured"):
        D.activation_metrics(inter)


def test_wrong_image_shape_is_a_clear_error():
    model = create("vit_nano", "fp")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 16, 16, 3\)"):
        model(jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="expected images"):
        model(jnp.zeros((2, 16, 16, 1)))


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown preset 'binaryvitt'"):
        create("vit_nano", "binaryvitt")
    with pytest.raises(ValueError, match="Unknown model variant 'deit_huge'"):
        create("deit_huge", "fp")
    with pytest.raises(ValueError, match="Unknown model (option|override)"):
        create("vit_nano", "fp", binarise_weights=True)


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
    x, _ = _batch(2)
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
