"""The native popcount kernels (:mod:`bvit_jax.deploy.native`) against the XLA ops and the packed forward's XLA path."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bvit_jax.deploy import native
from bvit_jax.deploy.bitops import masked_sign_sum, pack_planes, packed_matmul
from bvit_jax.deploy.export import pack_model
from bvit_jax.deploy.packed import packed_forward
from bvit_jax.nn.models import VisionTransformer, get_preset, get_variant
from bvit_jax.nn.options import ASM_MODES, BRANCH_NORMS
from tests.packed_helpers import model_forward, perturb, random_images

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native library unavailable: {native.load_error()}")


def _levels():
    return native.ISAS[: native.ISAS.index(native.best_isa()) + 1] if native.available() else ()


# K not a multiple of 32, M = 1, N = 3; K > 31 words exercises the AVX2 byte-count flush; N tails of every width.
SHAPES = [(1, 37, 3), (5, 64, 17), (13, 100, 33), (7, 1061, 70), (30, 384, 130)]


@pytest.mark.parametrize("isa", _levels())
def test_kernels_equal_the_xla_ops_exactly(isa):
    """Integer results are exact, so every level must equal bitops' XLA ops bit for bit."""
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        a, b = pack_planes(x), pack_planes(w.T).T
        ref = np.asarray(packed_matmul(a, b, k))
        np.testing.assert_array_equal(np.asarray(native.matmul(a, b, k, isa=isa)), ref, err_msg=f"{m, k, n}")
        # and: b's words along its first axis, as masked_sign_sum's v rows transposed
        mref = np.asarray(masked_sign_sum(a, b.T))
        np.testing.assert_array_equal(np.asarray(native.matmul(a, b, k, op="and", isa=isa)), mref)
        # fused sign-and-pack + epilogue: float(v) * alpha + bias, two float32 roundings like numpy's
        alpha = rng.uniform(0.5, 2.0, n).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        want = (ref.astype(np.float32) * alpha).astype(np.float32) + bias
        got = np.asarray(native.sign_matmul(x, b, alpha, bias, isa=isa))
        np.testing.assert_array_equal(got, want)
        got = np.asarray(native.matmul_scaled(a, b, np.float32(3.0), 0.0, k, mode="div", isa=isa))
        np.testing.assert_array_equal(got, ref.astype(np.float32) / np.float32(3.0))
        # grouped, with one shared activation
        g = jnp.stack([b, b ^ jnp.uint32(0x5555)])
        got = np.asarray(native.sign_matmul(x[None], g, 1.0, 0.0, isa=isa))
        np.testing.assert_array_equal(got[1], np.asarray(packed_matmul(a, g[1], k)).astype(np.float32))


def test_bad_input_is_refused_before_the_call():
    a = jnp.zeros((4, 2), jnp.uint32)
    with pytest.raises(TypeError, match="uint32"):
        native.matmul(a.astype(jnp.int32), jnp.zeros((2, 3), jnp.uint32), 40)
    with pytest.raises(ValueError, match="do not match"):
        native.matmul(a, jnp.zeros((3, 3), jnp.uint32), 40)
    with pytest.raises(ValueError, match="ceil"):
        native.matmul(a, jnp.zeros((2, 3), jnp.uint32), 70)
    with pytest.raises(ValueError, match="unknown native ISA"):
        native.matmul(a, jnp.zeros((2, 3), jnp.uint32), 40, isa="sse9")


@pytest.mark.parametrize("branch_norm", BRANCH_NORMS)
@pytest.mark.parametrize("preset, asm_mode", [("baseline", "token_mean")] + [("binaryvit", m) for m in ASM_MODES])
def test_native_forward_equals_the_xla_path_and_the_model(preset, asm_mode, branch_norm, monkeypatch):
    """Bit-identical logits: integers exact, and each float epilogue rounds as XLA does there
    (folded: product then add; layernorm: one fused multiply-add, XLA's contraction)."""
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3, depth=2)
    opts = dataclasses.replace(get_preset(preset).options, asm_mode=asm_mode, branch_norm=branch_norm)
    model = perturb(VisionTransformer(cfg, opts, rngs=nnx.Rngs(0)))
    packed = pack_model(model)
    x = random_images(cfg, b=3)
    ref = np.asarray(packed_forward(packed, x, backend="xla"))
    np.testing.assert_array_equal(ref, model_forward(model, x))
    every_level = (preset, asm_mode, branch_norm) == ("binaryvit", "token_mean", "layernorm")  # compiles are costly
    for isa in _levels() if every_level else (native.best_isa(),):
        monkeypatch.setenv("BVIT_NATIVE_ISA", isa)
        np.testing.assert_array_equal(np.asarray(packed_forward(packed, x, backend="native")), ref, err_msg=isa)
