"""Bit packing and XNOR-popcount ops (:mod:`bvit_jax.deploy.bitops`): bit order, plane order, exact integer dots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bvit_jax.deploy.bitops import (
    from_planes,
    masked_sign_sum,
    num_words,
    pack_bits_planes,
    pack_planes,
    pack_signs,
    packed_matmul,
    packed_sign_dot,
    to_planes,
    unpack_signs,
)
from tests.packed_helpers import sign


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 100, 384])
def test_pack_roundtrip_and_bit_order(n):
    rng = np.random.default_rng(n)
    w = rng.standard_normal((n, 7)).astype(np.float32)
    w[rng.random(w.shape) < 0.1] = 0.0  # sign(0) = +1
    words = pack_signs(w, axis=0)
    assert words.dtype == np.uint32 and words.shape == (num_words(n), 7)
    np.testing.assert_array_equal(unpack_signs(words, n, axis=0), sign(w))
    # Bit convention: element k is bit k % 32 of word k // 32; padding bits are 0.
    for k in range(n):
        assert ((words[k // 32, 0] >> np.uint32(k % 32)) & 1) == (w[k, 0] >= 0)
    if n % 32:
        assert words[-1, 0] >> np.uint32(n % 32) == 0
    # Same bytes as numpy.packbits(bitorder="little").
    b = np.packbits(w[:, 0] >= 0, bitorder="little")
    np.testing.assert_array_equal(words[:, 0].astype("<u4").view(np.uint8)[: b.size], b)
    # Standard <-> plane order, and the on-device packer agrees with the plane order.
    planes = to_planes(words, n, axis=0)
    np.testing.assert_array_equal(from_planes(planes, n, axis=0), words)
    np.testing.assert_array_equal(np.asarray(pack_planes(jnp.asarray(w.T))), planes.T)


def test_pack_signs_last_axis_batch():
    x = np.random.default_rng(0).standard_normal((2, 3, 45)).astype(np.float32)
    np.testing.assert_array_equal(unpack_signs(pack_signs(x), 45), sign(x))


@pytest.mark.parametrize("k", [20, 32, 100, 384])
def test_packed_matmul_equals_float_pm1_matmul(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((3, 11, k)).astype(np.float32)
    w = rng.standard_normal((k, 13)).astype(np.float32)
    ref = (sign(x) @ sign(w)).astype(np.int32)
    a, b = pack_planes(jnp.asarray(x)), jnp.asarray(to_planes(pack_signs(w, axis=0), k, axis=0))
    got = jax.jit(packed_matmul, static_argnums=2)(a, b, k)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), ref)
    # Isolated kernel (runtime live flag) and the grouped form give the same integers.
    live = jnp.bool_(True)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b, l: packed_matmul(a, b, k, live=l))(a, b, live)), ref)
    g = jax.jit(lambda a, b: packed_matmul(a, b, k))(jnp.stack([a.reshape(-1, a.shape[-1])] * 2), jnp.stack([b, b]))
    np.testing.assert_array_equal(np.asarray(g[1]).reshape(ref.shape), ref)


@pytest.mark.parametrize("d,n", [(12, 17), (64, 40), (20, 197)])
def test_attention_popcount_matmuls_exact(d, n):
    rng = np.random.default_rng(d + n)
    q = rng.standard_normal((2, 3, n, d)).astype(np.float32)
    k = rng.standard_normal((2, 3, n, d)).astype(np.float32)
    scores = jax.jit(lambda q, k: packed_sign_dot(pack_planes(q), pack_planes(k), d))(q, k)
    np.testing.assert_array_equal(np.asarray(scores), np.einsum("bhqd,bhkd->bhqk", sign(q), sign(k)).astype(np.int32))
    m = rng.random((2, 3, n, n)) > 0.7
    pv = jax.jit(lambda m, v: masked_sign_sum(pack_bits_planes(m), pack_planes(jnp.swapaxes(v, -1, -2))))(m, k)
    np.testing.assert_array_equal(
        np.asarray(pv), np.einsum("bhqk,bhkd->bhqd", m.astype(np.float32), sign(k)).astype(np.int32)
    )
