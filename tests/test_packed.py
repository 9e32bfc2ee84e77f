"""The packed forward (:mod:`bvit_jax.deploy.packed`) against the training-time model: every preset and ASM form."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bvit_jax.deploy import native
from bvit_jax.deploy.bitops import pack_planes, packed_matmul
from bvit_jax.deploy.export import export_model, load_packed, pack_model
from bvit_jax.deploy.packed import packed_forward
from bvit_jax.nn.models import VisionTransformer, create, get_preset, get_variant
from bvit_jax.nn.options import ASM_MODES, BRANCH_NORMS
from bvit_jax.nn.param_groups import flatten_with_paths
from tests.packed_helpers import model_forward, perturb, random_images, sign

# Every distinct binary model: baseline+grs builds the baseline's model and baseline+asm binaryvit's
# (tests/test_models.py::test_twin_presets_build_the_same_model), so the cases below cover all four presets.


def test_packed_forward_matches_fresh_model():
    """Unperturbed: ``P_b V_b`` is often exactly 0 and meets an unshifted sign; the model computes
    that exact 0 too (integer 0 times ``c``), not rounding noise, so it takes ``sign(0) = +1`` too."""
    model = create("vit_nano", "binaryvit", depth=4)
    x = random_images(model.cfg, b=4)
    np.testing.assert_allclose(
        np.asarray(packed_forward(pack_model(model), x)), model_forward(model, x), rtol=1e-5, atol=1e-6
    )


# The shipped ASM form (token_mean) with every branch norm, each other form with the default norm (LayerNorm,
# computed at run time) and one folded norm, and the baseline (no ASM) with the default: every preset, ASM form
# and branch norm, 8 cases instead of the 12 of the full product (the branch norm's code does not depend on ASM).
PACKED_CASES = [
    ("baseline", "token_mean", "layernorm"),
    *(("binaryvit", "token_mean", norm) for norm in BRANCH_NORMS),
    ("binaryvit", "per_token", "layernorm"),
    ("binaryvit", "per_token", "affine"),
    ("binaryvit", "per_head", "layernorm"),
    ("binaryvit", "per_head", "batchnorm"),
]
assert {(c[1], c[2]) for c in PACKED_CASES} >= {(m, "layernorm") for m in ASM_MODES}


@pytest.mark.parametrize("preset, asm_mode, branch_norm", PACKED_CASES)
def test_packed_forward_reproduces_every_sign(preset, asm_mode, branch_norm, monkeypatch):
    """Depth 4, odd widths: both forwards binarize every activation identically and give the same logits.

    Every ``asm_mode``: the packed forward computes the shift's statistic with the
    model's own function (:func:`bvit_jax.nn.activations.asm_statistic`), in the same order.

    The model computes its binary matmuls as exact integers scaled afterwards
    and its LayerNorms with the packed forward's function, so every sign input
    is the same float32 value (a sign can only differ when one value is
    rounded differently near 0). Under jit on CPU the logits are bit-identical, and the native kernels'
    (:mod:`bvit_jax.deploy.native`, where built) equal them bit for bit: integers exact, each float
    epilogue rounded as XLA does there (folded: product then add; layernorm: one fused multiply-add);
    every dispatch level the CPU runs for one case, the best one for the others (compiles are costly).
    With ``branch_norm='affine'`` the file holds the affine folded into each
    linear's scale and bias and the model computes that folded form itself
    (:func:`bvit_jax.nn.folding.fold_branch_affine`), so the same holds.
    """
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3, depth=4)
    opts = dataclasses.replace(get_preset(preset).options, asm_mode=asm_mode, branch_norm=branch_norm)
    model = perturb(VisionTransformer(cfg, opts, rngs=nnx.Rngs(0)))
    packed = pack_model(model)
    assert (packed.opts.asm_mode, packed.opts.branch_norm) == (asm_mode, branch_norm)
    x = random_images(cfg, b=4)
    graphdef, state = nnx.split(model)
    ref, inter = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, capture=True))(state, x)
    got, bits = packed_forward(packed, x, capture=True)
    assert sorted(bits) == sorted(inter) and len(bits) == cfg.depth * 9  # 6 linears + Q, K, V per block
    for path, b in bits.items():
        np.testing.assert_array_equal(np.asarray(b), np.asarray(inter[path]["shifted"]) >= 0, err_msg=path)
    ref, got = np.asarray(ref), np.asarray(got)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, ref)
    if native.available() and jax.default_backend() == "cpu":  # the native kernels: the XLA path's logits bit for bit
        every_level = (preset, asm_mode, branch_norm) == ("binaryvit", "token_mean", "layernorm")  # compiles cost
        for isa in native.ISAS[: native.ISAS.index(native.best_isa()) + 1] if every_level else (native.best_isa(),):
            monkeypatch.setenv("BVIT_NATIVE_ISA", isa)
            np.testing.assert_array_equal(np.asarray(packed_forward(packed, x, backend="native")), got, err_msg=isa)


def test_packed_forward_odd_widths_through_file():
    # embed 36 (not a multiple of 32), head dim 12, MLP 144, 37 tokens (2 mask words).
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3)
    model = perturb(VisionTransformer(cfg, get_preset("binaryvit").options, rngs=nnx.Rngs(0)))
    x = random_images(cfg)
    ref = model_forward(model, x)
    loaded = load_packed(export_model(model, data=None, preset="binaryvit"))
    assert loaded.cfg == cfg
    np.testing.assert_allclose(np.asarray(packed_forward(loaded, x)), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(packed_forward(loaded, x, attention="float")), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected images of shape"):
        packed_forward(loaded, x[:, :16])


def test_integer_dot_of_a_model_layer_is_exact():
    """The popcount dot of a real layer equals sign(x - shift) @ sign(W) exactly."""
    model = perturb(create("vit_nano", "binaryvit"))
    _, inter = model(random_images(model.cfg), capture=True)
    pk = pack_model(model)
    params = dict(flatten_with_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    for path in ["blocks/0/attn/q/linear", "blocks/1/mlp/fc2/linear"]:
        shifted = np.asarray(inter[path + "/act"]["shifted"])
        kernel = np.asarray(params[path + "/kernel"])
        ref = (sign(shifted) @ sign(kernel)).astype(np.int32)
        got = packed_matmul(pack_planes(jnp.asarray(shifted)), pk.tensors[path + "/kernel_bits"], shifted.shape[-1])
        np.testing.assert_array_equal(np.asarray(got), ref)
