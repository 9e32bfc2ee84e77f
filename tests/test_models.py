"""Models: every preset compiles and trains on vit_nano; capture; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bvit_jax.nn.activations import SignActivation
from bvit_jax.nn.models import PRESETS, config_overrides, create, get_preset, override_fields
from bvit_jax.train import diagnostics as D
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


def test_twin_presets_build_the_same_model():
    """baseline+grs and baseline+asm differ from baseline and binaryvit only in training (GRS; the
    recipe's table), so model tests run the three distinct models and cover all five presets."""
    assert get_preset("baseline+grs").options == get_preset("baseline").options
    assert get_preset("baseline+asm").options == get_preset("binaryvit").options
    assert {"fp", "baseline", "baseline+grs", "baseline+asm", "binaryvit"} == set(PRESETS)


LE_LI = {"rprelu_everywhere": True, "attention_bypass": True}  # Le & Li's switches (docs/method.md)


@pytest.mark.parametrize(
    "preset, switches",
    [("fp", {}), ("baseline", {}), ("binaryvit", {}), ("binaryvit", LE_LI)],
    ids=["fp", "baseline", "binaryvit", "binaryvit+le_li"],
)
def test_preset_compiles_and_every_parameter_gets_a_finite_nonzero_gradient(preset, switches):
    model = create("vit_nano", preset, **switches)
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
    if switches:  # the switches' RPReLUs and the bypass's LayerNorm are among them
        assert any("/attn/context_norm/" in p for p in params) and any("/attn/context_act/" in p for p in params)
        assert any("/attn/q/out_act/slope" in p for p in params) and any("/mlp/fc2/out_act/slope" in p for p in params)


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

    # Jitted (op-by-op dispatch of these forwards and gradients costs tens of seconds), each direction an
    # argument (+1 / -1) of one compiled gradient rather than a program of its own.
    of_levels = jax.jit(jax.grad(lambda p, way: way * jnp.sum(levels(p))))
    of_loss = jax.jit(jax.grad(lambda p, way: way * loss(p)))
    forward, levels_of = jax.jit(lambda p: nnx.merge(graphdef, p)(x)), jax.jit(levels)
    up, down = (lambda p: of_levels(p, 1.0)), (lambda p: of_levels(p, -1.0))
    descend, ascend = (lambda p: of_loss(p, 1.0)), (lambda p: of_loss(p, -1.0))
    for gradient in (up, descend, ascend, down, descend):
        updates, state = tx.update(gradient(params), state, params)
        params = optax.apply_updates(params, updates)
        c = np.asarray(levels_of(params))
        assert np.all(c > 0) and np.all(np.isfinite(c)), c
        assert bool(jnp.all(jnp.isfinite(forward(params))))
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(descend(params)))


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
    from bvit_jax.train import recipes

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


# ----------------------------------------------------------------------------- drop path and remat
def test_drop_path_rates_are_linear_in_depth_from_0_to_the_rate():
    from bvit_jax.nn.models import drop_path_rates

    rates = drop_path_rates(0.1, 12)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1, abs=1e-15) and len(rates) == 12
    np.testing.assert_allclose(rates, np.linspace(0.0, 0.1, 12), rtol=0, atol=1e-16)  # timm's linspace
    assert drop_path_rates(0.3, 1) == [0.0] and drop_path_rates(0.0, 4) == [0.0] * 4
    model = nnx.eval_shape(lambda: create("deit_small", "fp", drop_path_rate=0.1))
    assert [b.drop_path_rate for b in model.blocks] == rates


@pytest.mark.parametrize("preset", ["fp", "binaryvit"])
def test_the_forward_without_keys_is_unchanged_by_the_drop_path_rate(preset):
    """Eval, diagnostics, export and the teacher call the model without keys: the rate changes nothing
    there (bit for bit, same parameters); with keys, the rate 0.5 forward differs."""
    from bvit_jax.nn.models import drop_path_keys

    x, _ = nano_batch()
    plain, dropping = create("vit_nano", preset), create("vit_nano", preset, drop_path_rate=0.5)
    for a, b in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)), jax.tree.leaves(nnx.state(dropping, nnx.Param))):
        np.testing.assert_array_equal(a, b)  # the rate is no parameter
    np.testing.assert_array_equal(np.asarray(dropping(x)), np.asarray(plain(x)))
    c_plain, c_drop = plain(x, capture=True)[1], dropping(x, capture=True)[1]
    for k in c_plain:
        np.testing.assert_array_equal(np.asarray(c_drop[k]["x"]), np.asarray(c_plain[k]["x"]), err_msg=k)
    keys = drop_path_keys(0, jnp.int32(0), jnp.arange(B))
    assert not np.array_equal(np.asarray(dropping(x, drop_path_keys=keys)), np.asarray(plain(x)))
    np.testing.assert_array_equal(np.asarray(plain(x, drop_path_keys=keys)), np.asarray(plain(x)))  # rate 0


def _grads(policy, preset="binaryvit", keys=None, run=True, **overrides):
    """Jitted loss, gradients and new BatchNorm statistics of vit_nano in its training view
    (``run=False``: only the jitted function and its arguments)."""
    from bvit_jax.nn.models import training_view

    x, y = nano_batch()
    model = training_view(create("vit_nano", preset, remat_policy=policy, drop_path_rate=0.5, **overrides))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)  # as the train step holds them

    def loss(p, stats):
        m = nnx.merge(graphdef, p, stats)
        logits = m(x, drop_path_keys=keys)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if not run:
        return fn, (params, stats), None, None, None
    (value, new_stats), grads = fn(params, stats)
    return fn, (params, stats), value, grads, new_stats


# fp: every policy; binaryvit with BatchNorm (whose running averages move inside the remat'ed block): 'full'
# (the cheapest cover of the binary layers' custom VJPs and the state update, for the suite's time).
@pytest.mark.parametrize(
    "preset, branch_norm, policies",
    [
        ("fp", None, ("full", "dots_saveable", "dots_with_no_batch_dims_saveable")),
        ("binaryvit", "batchnorm", ("full",)),
    ],
)
def test_every_remat_policy_gives_the_gradients_of_no_remat(preset, branch_norm, policies):
    """Remat recomputes the same float32 operations in the backward pass: the loss (and the BatchNorm
    running averages, updated inside the remat'ed block) are bit-identical, and the gradients agree up to
    the order XLA sums in, which differs between the two programs (measured on CPU: up to 2 ulp of a
    module's largest gradient entry; bit-identical for many leaves).

    Bound, from the arithmetic: each gradient entry is a float32 sum over the n = B * T = 68 tokens (and
    a contraction inside each layer) of cotangent terms, reached through ~4 chained sums (head, MLP,
    attention, patch embedding); a reordered sum of n terms moves by at most gamma_n * sum |terms|
    (tests/tolerances.py), and the terms of a module's gradients (the output cotangents, times inputs
    that a LayerNorm keeps of size ~1) are bounded by its largest gradient entry M. So |delta| <=
    4 * gamma_n * M per module (kernel and bias together: a bias whose exact gradient is 0, as the key
    bias under the softmax's shift invariance, is rounding noise of the size of its module's terms)."""
    from bvit_jax.nn.models import drop_path_keys
    from bvit_jax.nn.param_groups import flatten_with_paths
    from tests.tolerances import assert_within, gamma_n

    keys = drop_path_keys(0, jnp.int32(1), jnp.arange(B))
    overrides = {} if branch_norm is None else {"branch_norm": branch_norm}
    _, _, v0, g0, s0 = _grads("none", preset, keys, **overrides)
    ref = dict(flatten_with_paths(g0))
    module = lambda path: path.rsplit("/", 1)[0]
    scale: dict[str, float] = {}
    for path, g in ref.items():
        scale[module(path)] = max(scale.get(module(path), 0.0), float(np.max(np.abs(g))))
    bound = 4 * gamma_n(B * 17)
    for policy in policies:
        _, _, v, g, s = _grads(policy, preset, keys, **overrides)
        assert float(v) == float(v0), policy
        for path, got in flatten_with_paths(g):
            assert_within(got, ref[path], bound * scale[module(path)], f"{policy}: {path}")
        assert len(jax.tree.leaves(s)) == (24 if branch_norm else 0)  # mean, var of 6 linears x 2 blocks
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s0)):
            np.testing.assert_array_equal(a, b, err_msg=policy)


@pytest.mark.parametrize("preset", ["fp", "binaryvit"])
def test_each_remat_policy_recomputes_what_it_does_not_save(preset):
    """In the program JAX hands to XLA, each remat'ed block is fenced by an optimisation barrier and the
    backward pass recomputes the block's matmuls the policy does not save: 'full' all of them,
    'dots_with_no_batch_dims_saveable' the two attention matmuls (batched over heads), 'dots_saveable'
    none. (Counted before XLA's passes: XLA:CPU drops the barriers and merges the recomputation back,
    so on CPU remat saves no memory; see the memory test below.)"""
    from bvit_jax.nn.models import REMAT_POLICIES

    depth = 2  # vit_nano
    counts = {}
    for policy in REMAT_POLICIES:
        fn, args, *_ = _grads(policy, preset, run=False)
        text = fn.lower(*args).as_text()
        counts[policy] = (text.count("stablehlo.dot_general"), text.count("optimization_barrier"))
    dots = {p: c[0] for p, c in counts.items()}
    assert counts["none"][1] == 0 and all(counts[p][1] == depth for p in REMAT_POLICIES if p != "none")
    assert dots["dots_saveable"] == dots["none"]
    assert dots["dots_with_no_batch_dims_saveable"] == dots["none"] + 2 * depth  # Q K^T and P V per block
    assert dots["full"] > dots["dots_with_no_batch_dims_saveable"]


@pytest.mark.skipif(
    jax.default_backend() == "cpu",
    reason="XLA:CPU removes optimisation barriers and merges the recomputation back (measured: 'full' needs "
    "more temp memory than 'none' there); remat saves memory on GPU and TPU",
)
def test_full_remat_lowers_the_compiled_train_step_temp_memory():
    """A depth-4 ViT at batch 64: the gradient program's temp buffers (the saved activations) shrink with
    'full' remat, which keeps only each block's input."""
    from bvit_jax.nn.models import training_view

    x = jax.random.normal(jax.random.key(0), (64, 32, 32, 3))
    y = jnp.arange(64) % 10
    temp = {}
    for policy in ("none", "full"):
        model = training_view(
            create("vit_nano", "binaryvit", image_size=32, embed_dim=64, depth=4, remat_policy=policy)
        )
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p, graphdef=graphdef):
            return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["none"], temp


def test_unknown_remat_policy_and_bad_drop_path_rate_are_clear_errors():
    with pytest.raises(ValueError, match="remat_policy='ful' is not one of"):
        create("vit_nano", "fp", remat_policy="ful")
    with pytest.raises(ValueError, match=r"drop_path_rate=1.0 must be in \[0, 1\)"):
        create("vit_nano", "fp", drop_path_rate=1.0)
