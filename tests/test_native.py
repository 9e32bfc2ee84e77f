"""The native popcount kernels (:mod:`bvit_jax.deploy.native`) against the XLA ops and the packed forward's XLA path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bvit_jax.deploy import native
from bvit_jax.deploy.bitops import masked_sign_sum, pack_planes, packed_matmul

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


# The whole packed forward on the native path, every preset, ASM form and branch norm, against the XLA
# path and the model: tests/test_packed.py::test_packed_forward_reproduces_every_sign.
