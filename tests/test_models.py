"""Models: every preset compiles and trains on vit_nano; capture; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bvit_jax import diagnostics as D
from bvit_jax.layers import SignActivation
from bvit_jax.models import PRESETS, config_overrides, create, override_fields
from tests.train_helpers import NANO_BATCH, nano_batch

B = NANO_BATCH


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
    x, y = nano_batch()
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
    x, y = nano_batch(3)
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
    x, _ = nano_batch(1)
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
    _, inter = model(nano_batch()[0], capture=True)
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
