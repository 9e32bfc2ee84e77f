"""The binarizer seam: a layer's binarizer objects decide training, accounting, export and the packed forward.

Binarizers written here as a user would (docs/architecture.md, "How to add"):
a new surrogate gradient with the +-1 forward (it must train with its own
gradient and export and run packed with nothing else added), and a {0, 1}
forward (counted as 1 bit, refused by export and the packed forward with the
layer named, since no packed matmul computes it), both for activations; and
a kernel binarizer with a new gradient (the straight-through estimator
without its clip), chosen by ``model.kernel_binarizer``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bvit_jax.deploy import kernel_formats
from bvit_jax.deploy.bitops import unpack_signs
from bvit_jax.deploy.export import export_model, load_packed
from bvit_jax.deploy.packed import check_packable, packed_forward
from bvit_jax.nn import binarize
from bvit_jax.nn.binarize import (
    MASK01,
    PM1,
    Binarizer,
    Packing,
    WeightBinarizer,
    channel_alpha,
    register_activation_binarizer,
    register_kernel_binarizer,
    sign,
)
from bvit_jax.nn.models import create
from bvit_jax.nn.summary import summary
from tests.packed_helpers import model_forward, perturb, random_images


@jax.custom_vjp
def _tanh_sign(x):
    return sign(x)


def _tanh_sign_fwd(x):
    return sign(x), x


def _tanh_sign_bwd(x, g):
    return (g * (1.0 - jnp.tanh(x) ** 2),)


_tanh_sign.defvjp(_tanh_sign_fwd, _tanh_sign_bwd)


@dataclasses.dataclass(frozen=True)
class TanhSign(Binarizer):
    """sign(x) forward, ``1 - tanh(x)^2`` backward: only the gradient is new, so the default +-1 packing."""

    name: ClassVar[str] = "tanh_test"

    def __call__(self, x):
        return _tanh_sign(x)


@dataclasses.dataclass(frozen=True)
class Heaviside(Binarizer):
    """A {0, 1} forward ``[x > 0]`` (straight-through backward): a new packing."""

    name: ClassVar[str] = "heaviside_test"
    packing: ClassVar[Packing] = Packing(MASK01)

    def __call__(self, x):
        return jax.lax.stop_gradient((x > 0).astype(x.dtype) - x) + x


@pytest.fixture
def registry(monkeypatch):
    """The activation binarizers' registry, restored after the test."""
    monkeypatch.setattr(binarize, "ACTIVATION_BINARIZERS", dict(binarize.ACTIVATION_BINARIZERS))
    return binarize.ACTIVATION_BINARIZERS


def _nano(act_binarizer, **kw):
    return create("vit_nano", "binaryvit", image_size=16, embed_dim=24, num_heads=2, act_binarizer=act_binarizer, **kw)


def _file_runs_the_model(model):
    """``model`` exported and loaded back: the file's packed forward gives the model's eval logits (bit for bit on
    CPU, where both compute the same float32 operations); returns the loaded model."""
    loaded = load_packed(export_model(model, data=None))
    x = random_images(model.cfg)
    got, ref = np.asarray(packed_forward(loaded, x)), model_forward(model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, ref)
    return loaded


def test_registered_binarizer_is_chosen_by_name_and_unknown_or_taken_names_are_refused(registry):
    register_activation_binarizer(TanhSign())
    model = _nano("tanh_test")
    assert model.blocks[0].attn.q.linear.input_binarizer == TanhSign()
    assert model.blocks[0].attn.q_sign.binarizer == TanhSign()
    with pytest.raises(ValueError, match="exists already"):
        register_activation_binarizer(TanhSign())
    with pytest.raises(TypeError, match="Binarizer instance"):
        register_activation_binarizer("tanh_test")
    with pytest.raises(ValueError, match="Unknown activation binarizer 'nope'"):
        _nano("nope")


def test_new_surrogate_gradient_trains_with_its_gradient(registry):
    """The gradient through a sign input is the binarizer's own: 1 - tanh^2, not ApproxSign's max(0, 2 - 2|x|)."""
    register_activation_binarizer(TanhSign())
    x = jnp.asarray([-1.5, -0.3, 0.0, 0.4, 2.0])
    x64 = np.asarray(x, np.float64)  # the float32 inputs, exactly
    # No sums here (each gradient is elementwise), so no summation order enters. The bound is absolute, from
    # float32 rounding: XLA's float32 tanh is within a few ulp of tanh (|t| < 1, so within 4 * 2^-24 ~ 2.4e-7,
    # on any CPU's code path), which moves 1 - t^2 by at most 2|t| * 2.4e-7 ~ 4.8e-7, plus the product's and
    # the subtraction's roundings (2^-24 each, the result <= 1); ApproxSign's 2 - 2|x| rounds once or twice
    # (<= 2 * 2^-24). 2e-6 covers both with room, and the two gradients differ by >= 0.1 at every input here.
    for name, expect in (
        ("tanh_test", 1.0 - np.tanh(x64) ** 2),
        ("approx", np.maximum(0.0, 2 - 2 * np.abs(x64))),
    ):
        act = _nano(name).blocks[0].mlp.fc1.linear.act.binarizer
        np.testing.assert_allclose(jax.grad(lambda v, a=act: a(v).sum())(x), expect, rtol=0, atol=2e-6)


def test_new_surrogate_gradient_exports_and_runs_packed_bit_for_bit(registry):
    """Same packing as ApproxSign: the summary is the same and the file runs the model's eval forward."""
    register_activation_binarizer(TanhSign())
    model = perturb(_nano("tanh_test"))
    s_new, s_ref = summary(model), summary(_nano("approx"))
    assert (s_new.total.binary_macs, s_new.total.fp_macs, s_new.params_1bit) == (
        s_ref.total.binary_macs,
        s_ref.total.fp_macs,
        s_ref.params_1bit,
    )
    assert _file_runs_the_model(model).opts.act_binarizer == "tanh_test"


def test_new_forward_is_counted_as_one_bit_and_refused_by_the_deployment_path(registry):
    register_activation_binarizer(Heaviside())
    model = _nano("heaviside_test")
    s = summary(model)
    assert s.total.binary_macs == summary(_nano("approx")).total.binary_macs > 0  # precision 1: binary MACs
    with pytest.raises(ValueError, match=r"cannot pack the block linear of blocks/0/attn/k/linear: .*Heaviside"):
        check_packable(model.cfg, model.opts)
    with pytest.raises(ValueError, match="cannot pack the block linear"):
        export_model(model, data=None)


def test_float_inputs_to_binary_weights_are_refused_with_the_layer_named():
    model = create("vit_nano", "baseline", binarize_acts=False, learnable_shift=False, asm=False)
    with pytest.raises(ValueError, match=r"blocks/0/attn/k/linear: its operands \(float x WeightBinarizer\)"):
        check_packable(model.cfg, model.opts)


def test_kernel_formats_are_chosen_by_packing():
    """A ±1 kernel is stored as sign bits and alpha (ones without a scale); another packing has no stored form."""
    w = np.asarray(jax.random.normal(jax.random.key(0), (70, 3)), np.float32)  # in not a multiple of 32
    for scale in (True, False):
        wb = binarize.WeightBinarizer(scale=scale)
        fmt = kernel_formats.kernel_format(wb)
        stored = fmt.pack(w, wb)
        assert {k: (str(v.dtype), v.shape) for k, v in stored.items()} == {
            k: spec[:2] for k, spec in fmt.tensors(70, 3).items()
        }
        alpha = np.abs(w).mean(0) if scale else np.ones(3)
        # mean of 70 |w| in float32: the sum's rounding bound gamma_70 * sum|w| over 70, well under 1e-5 relative
        np.testing.assert_allclose(stored["alpha"], alpha, rtol=1e-5)
        np.testing.assert_array_equal(unpack_signs(stored["kernel_bits"], 70, axis=0), np.where(w >= 0, 1.0, -1.0))

    @dataclasses.dataclass(frozen=True)
    class Ternary(Binarizer):
        name: ClassVar[str] = "ternary_test"
        packing: ClassVar[Packing] = Packing(PM1, bits=2)

    with pytest.raises(ValueError, match=r"blocks/0/mlp/fc1/linear/kernel: .*Ternary packs as .*bits=2"):
        kernel_formats.kernel_format(Ternary(), "blocks/0/mlp/fc1/linear/kernel")


# ----------------------------------------------------------------------------- a kernel binarizer
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _unclipped_matmul(x, w, scale):
    return binarize.binary_matmul(x, w, scale)  # the same forward, bit for bit


def _unclipped_fwd(x, w, scale):
    return binarize.binary_matmul(x, w, scale), (x, w)


def _unclipped_bwd(scale, res, g):
    """``dL/dx = g @ W_b^T``, ``dL/dW = alpha * (x^T @ g)``: the straight-through gradient without ``1{|W| <= 1}``."""
    x, w = res
    alpha = channel_alpha(w) if scale else None
    wb = alpha * sign(w) if scale else sign(w)
    dx = jax.lax.dot_general(g, wb.astype(x.dtype), (((1,), (1,)), ((), ())))
    dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, alpha * dw if scale else dw


_unclipped_matmul.defvjp(_unclipped_fwd, _unclipped_bwd)


@dataclasses.dataclass(frozen=True)
class UnclippedSign(WeightBinarizer):
    """``alpha * sign(W)`` forward, straight-through backward without the clip: only the gradient is new."""

    name: ClassVar[str] = "unclipped_test"
    ste_window: ClassVar[float] = math.inf  # the gradient reaches every latent weight

    def matmul(self, x, w):
        return _unclipped_matmul(x, w, self.scale)

    def unscaled_matmul(self, x, w):
        return _unclipped_matmul(x, w, False)


@pytest.fixture
def kernel_registry(monkeypatch):
    """The kernel binarizers' registry, restored after the test."""
    monkeypatch.setattr(binarize, "KERNEL_BINARIZERS", dict(binarize.KERNEL_BINARIZERS))
    return binarize.KERNEL_BINARIZERS


def test_registered_kernel_binarizer_is_chosen_by_name_and_trains_with_its_gradient(kernel_registry):
    """``model.kernel_binarizer`` builds every binary linear with the registered class (with
    ``weight_scale``); the kernel gradient is the new one: nonzero where ``|W| > 1`` (the default's
    is exactly 0 there) and bit for bit the default's elsewhere (the same operations, times 1)."""
    register_kernel_binarizer(UnclippedSign)
    model = _nano("approx", kernel_binarizer="unclipped_test")
    assert model.blocks[0].mlp.fc2.linear.weight_binarizer == UnclippedSign(scale=True)
    unscaled = _nano("approx", kernel_binarizer="unclipped_test", weight_scale=False)
    assert unscaled.blocks[0].attn.q.linear.weight_binarizer == UnclippedSign(scale=False)
    with pytest.raises(ValueError, match="exists already"):
        register_kernel_binarizer(UnclippedSign)
    with pytest.raises(TypeError, match="WeightBinarizer subclass"):
        register_kernel_binarizer(TanhSign)
    with pytest.raises(ValueError, match="Unknown kernel binarizer 'nope'"):
        _nano("approx", kernel_binarizer="nope")

    x = jnp.where(jax.random.normal(jax.random.key(1), (6, 40)) >= 0, 1.0, -1.0)
    w = 1.5 * jax.random.normal(jax.random.key(2), (40, 5))  # about half of |W| > 1
    g = jax.random.normal(jax.random.key(3), (6, 5))
    grads = {}
    for b in (UnclippedSign(), WeightBinarizer()):
        y, vjp = jax.vjp(b.matmul, x, w)
        grads[type(b).__name__] = vjp(g)[1]
        np.testing.assert_array_equal(y, binarize.binary_matmul(x, w, True))  # one forward
    outside = np.abs(np.asarray(w)) > 1
    assert outside.any() and (~outside).any()
    new, ref = np.asarray(grads["UnclippedSign"]), np.asarray(grads["WeightBinarizer"])
    assert np.all(ref[outside] == 0) and np.all(new[outside] != 0)
    np.testing.assert_array_equal(new[~outside], ref[~outside])


def test_the_trainer_counts_latent_weights_outside_the_kernel_binarizers_own_gradient_window(kernel_registry):
    """``outside_window/all`` of a train step is the share of latent weights past the chosen kernel
    binarizer's ``ste_window``: the default's |W| > 1 (those get no gradient), none for one whose
    gradient is not clipped (they all get one)."""
    from bvit_jax.nn.param_groups import latent_weight_mask
    from bvit_jax.runs.workdir import build_model
    from bvit_jax.train.optim import build_optimizer
    from bvit_jax.train.trainer import init_train_state, make_train_step, split_for_training
    from tests.train_helpers import tiny_config

    register_kernel_binarizer(UnclippedSign)
    shares = {}
    for name in ("weight", "unclipped_test"):
        cfg = tiny_config("baseline", distill__enabled=False, model__overrides__kernel_binarizer=name)
        graphdef, params, stats = split_for_training(build_model(cfg))
        latent = latent_weight_mask(build_model(cfg), params)
        # Latent weights drawn so that about half are past 1 (N(0, 1.5^2): P(|W| > 1) = 0.50).
        leaves, tree = jax.tree.flatten(params)
        flags = jax.tree.leaves(latent)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        leaves = [1.5 * jax.random.normal(k, v.shape) if m else v for k, v, m in zip(keys, leaves, flags)]
        params = jax.tree.unflatten(tree, leaves)
        tx = build_optimizer(cfg, params, latent, total_steps=8, warmup_steps=2, grs_warmup_steps=0)
        step = make_train_step(cfg, graphdef, latent, tx)
        labels = jnp.arange(8) % 10
        images = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
        batch = {"image": images, "label": jax.nn.one_hot(labels, 10), "label_index": labels}
        state, metrics = jax.jit(step)(init_train_state(params, tx, latent, stats), batch, None)
        new = [np.asarray(v) for v, m in zip(jax.tree.leaves(state["params"]), flags) if m]
        assert len(new) == 6  # the bound below counts them
        expected = sum(int((np.abs(v) > 1).sum()) for v in new) / sum(v.size for v in new)
        shares[name] = (float(metrics["outside_window/all"]), expected)
    got, expected = shares["weight"]
    # The logged share is float32: per layer an exact count (< 2^24) divided by its size (one rounding), times
    # the size, summed over the L latent kernels and divided by the total: at most (L + 3) roundings of 2^-24
    # relative, L = 6 here (q, k, v, proj, fc1, fc2), so 5.4e-7 < 1e-6.
    assert 0.4 < expected < 0.6 and got == pytest.approx(expected, rel=1e-6)
    assert shares["unclipped_test"][0] == 0.0


def test_registered_kernel_binarizer_exports_and_runs_packed_bit_for_bit(kernel_registry):
    """Same packing as the default: the file records the binarizer's name, loads it back and runs the
    model's eval forward bit for bit on CPU."""
    register_kernel_binarizer(UnclippedSign)
    model = perturb(_nano("approx", kernel_binarizer="unclipped_test"))
    assert _file_runs_the_model(model).opts.kernel_binarizer == "unclipped_test"


def test_a_file_whose_binarizers_this_process_has_not_registered_loads_as_the_built_in_ones(
    registry, kernel_registry, caplog
):
    """A process that never registered the training run's binarizers (``bvit-predict`` elsewhere) still loads
    and runs the file: the names read as the built-in ones, with a warning naming each, and the logits are the
    registered model's (the file stores the same sign bits and alpha; the forward needs no gradient)."""
    register_activation_binarizer(TanhSign())
    register_kernel_binarizer(UnclippedSign)
    model = perturb(_nano("tanh_test", kernel_binarizer="unclipped_test"))
    blob = export_model(model, data=None)
    x = random_images(model.cfg)
    ref = np.asarray(packed_forward(load_packed(blob), x))
    del binarize.ACTIVATION_BINARIZERS["tanh_test"], binarize.KERNEL_BINARIZERS["unclipped_test"]
    with caplog.at_level("WARNING", logger="bvit_jax.deploy.export"):
        loaded = load_packed(blob)
    assert (loaded.opts.act_binarizer, loaded.opts.kernel_binarizer) == ("approx", "weight")
    assert "'tanh_test' is not registered" in caplog.text and "'unclipped_test' is not registered" in caplog.text
    np.testing.assert_array_equal(np.asarray(packed_forward(loaded, x)), ref)
