"""Bit packing and XNOR-popcount ops: signs as ``uint32`` words and exact +-1 dot products on them.

Knows nothing of models: the packed ViT forward (:mod:`bvit_jax.deploy.packed`) and the
exporter (:mod:`bvit_jax.deploy.export`) build on these ops.

A binary layer of a trained model multiplies ``sign(x - shift(x))`` by
``alpha * sign(W)``. Both factors are +-1 vectors, so the layer can run on
bits: for ``a, b`` in ``{-1, +1}^n`` stored as bits (``1`` for ``+1``, ``0``
for ``-1``)::

    dot(a, b) = n - 2 * popcount(xor(a_bits, b_bits))

(``xor`` is 1 exactly where the signs differ; agreeing positions add +1,
differing ones -1). The binary linear layer is then
``y = alpha * (n - 2 * popcount(xor(...))) + b``, with the integer dot product
exact.

Bit conventions
===============

Everywhere: bit ``1`` means ``+1`` (``x >= 0``, i.e. ``sign(0) = +1``), bit
``0`` means ``-1``; words are ``uint32``; bits are packed along the **input**
(contracted) dimension; padding positions hold bit ``0`` in *both* operands, so
their ``xor`` is 0 and they never count, and ``n`` is the true (unpadded)
length.

Two orders of the bits inside the ``W = ceil(n / 32)`` words of a row:

* **standard** (the exported file, :func:`pack_signs` / :func:`unpack_signs`):
  element ``k`` is bit ``k % 32`` (LSB-first) of word ``k // 32``; the same
  bytes as ``numpy.packbits(bits, bitorder="little")`` read as little-endian
  ``uint32``. Padding: the top bits of the last word.
* **plane** (the runtime order, :func:`pack_planes` / :func:`to_planes`):
  element ``k`` is bit ``k // W`` of word ``k % W``. Bit ``j`` of all words of
  a row comes from the contiguous slice ``k in [j*W, (j+1)*W)``, so packing an
  activation is 32 contiguous slices shifted and OR-ed (one elementwise XLA
  fusion, which also absorbs the ``x - shift`` before it) instead of a
  reduction over a minor axis of 32 (measured about 2x slower on CPU).
  Padding: positions ``k >= n`` of the ``32*W`` slots.

The dot product only needs both operands in the same order; kernels are
converted once at load time (:func:`to_planes`).

XNOR-popcount matmul on CPU
===========================

:func:`packed_matmul` accumulates one word at a time:
``acc[m, n] += popcount(a[m, w] ^ b[w, n])`` for ``w = 0 .. W-1``, written as
an unrolled sum over ``w`` that XLA fuses into one elementwise loop over
``(M, N)`` (vectorised along ``N`` with AVX-512 ``vpopcntd``). The broadcast
then reduce form ``sum(popcount(a[:, None, :] ^ b.T[None]), -1)`` is up to 30x
slower for wide inputs, and a ``fori_loop`` over words 2-4x slower (it streams
the ``(M, N)`` accumulator through memory once per word). ``uint64`` words
(which need ``jax_enable_x64``) measured no faster than ``uint32``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "WORD_BITS",
    "num_words",
    "pack_signs",
    "unpack_signs",
    "to_planes",
    "from_planes",
    "pack_planes",
    "pack_bits_planes",
    "packed_matmul",
    "packed_sign_dot",
    "masked_sign_sum",
]

WORD_BITS = 32
_WORD = np.uint32


def num_words(n: int) -> int:
    """Words of 32 bits that hold ``n`` bits: ``ceil(n / 32)``."""
    return -(-int(n) // WORD_BITS)


# --------------------------------------------------------------------------
# Standard order (host side, numpy): the exported file.
# --------------------------------------------------------------------------


def pack_signs(x, axis: int = -1) -> np.ndarray:
    """Signs of ``x`` packed along ``axis`` in the standard order (numpy).

    ``bit = 1`` where ``x >= 0`` (``sign(0) = +1``), else ``0``; element ``k``
    of the axis is bit ``k % 32`` of word ``k // 32`` (LSB-first); the axis
    shrinks from ``n`` to ``ceil(n / 32)`` ``uint32`` words, padding bits 0.
    """
    x = np.asarray(x)
    bits = np.moveaxis(x >= 0, axis, -1)
    n = bits.shape[-1]
    packed = np.packbits(bits, axis=-1, bitorder="little")  # (..., ceil(n/8)) bytes
    nbytes = num_words(n) * 4
    if packed.shape[-1] != nbytes:
        pad = [(0, 0)] * (packed.ndim - 1) + [(0, nbytes - packed.shape[-1])]
        packed = np.pad(packed, pad)
    words = np.ascontiguousarray(packed).view("<u4").astype(_WORD, copy=False)
    return np.ascontiguousarray(np.moveaxis(words, -1, axis))


def unpack_signs(words, n: int, axis: int = -1, dtype=np.float32) -> np.ndarray:
    """Inverse of :func:`pack_signs`: ``+1``/``-1`` values of length ``n`` along ``axis``."""
    w = np.moveaxis(np.asarray(words, dtype=_WORD), axis, -1)
    if w.shape[-1] != num_words(n):
        raise ValueError(f"{w.shape[-1]} words cannot hold exactly n={n} bits (need {num_words(n)})")
    b = np.unpackbits(np.ascontiguousarray(w.astype("<u4")).view(np.uint8), axis=-1, bitorder="little")[..., :n]
    return np.moveaxis(np.where(b == 1, 1, -1).astype(dtype), -1, axis)


def _bits_standard(words: np.ndarray) -> np.ndarray:
    """(…, W) standard-order words -> (…, 32*W) bits (0/1, uint8), padding included."""
    return np.unpackbits(np.ascontiguousarray(words.astype("<u4")).view(np.uint8), axis=-1, bitorder="little")


def to_planes(words, n: int, axis: int = 0) -> np.ndarray:
    """Re-order standard-order words (:func:`pack_signs`) into the plane order.

    Standard: element ``k`` at word ``k // 32``, bit ``k % 32``. Plane: element
    ``k`` at word ``k % W``, bit ``k // W``. Padding stays 0.
    """
    w = np.moveaxis(np.asarray(words, dtype=_WORD), axis, -1)
    nw = w.shape[-1]
    if nw != num_words(n):
        raise ValueError(f"{nw} words cannot hold exactly n={n} bits (need {num_words(n)})")
    bits = _bits_standard(w)  # (..., 32*W), element k at position k
    bits[..., n:] = 0
    planes = bits.reshape(bits.shape[:-1] + (WORD_BITS, nw))  # [j, w] = element j*W + w
    weights = (np.uint64(1) << np.arange(WORD_BITS, dtype=np.uint64))[:, None]
    out = (planes.astype(np.uint64) * weights).sum(axis=-2).astype(_WORD)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def from_planes(words, n: int, axis: int = 0) -> np.ndarray:
    """Inverse of :func:`to_planes` (plane order -> standard order)."""
    w = np.moveaxis(np.asarray(words, dtype=_WORD), axis, -1)
    nw = w.shape[-1]
    if nw != num_words(n):
        raise ValueError(f"{nw} words cannot hold exactly n={n} bits (need {num_words(n)})")
    j = np.arange(WORD_BITS, dtype=_WORD)
    planes = (w[..., None, :] >> j[:, None]) & 1  # (..., 32, W): [j, w] = element j*W + w
    bits = planes.reshape(w.shape[:-1] + (WORD_BITS * nw,))[..., :n]
    signs = np.where(bits == 1, 1.0, -1.0)
    return pack_signs(np.moveaxis(signs, -1, axis), axis=axis)


# --------------------------------------------------------------------------
# Plane order and popcount ops (device side, jnp; used under jit).
# --------------------------------------------------------------------------


def pack_bits_planes(bits: jax.Array) -> jax.Array:
    """Pack a boolean array along its last axis in the plane order: ``(..., n) -> (..., ceil(n/32))`` uint32.

    Word ``w`` bit ``j`` = ``bits[..., j*W + w]``; positions ``>= n`` are 0.
    """
    n = bits.shape[-1]
    nw = num_words(n)
    pad = nw * WORD_BITS - n
    if pad:
        bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    out = None
    for j in range(WORD_BITS):
        t = bits[..., j * nw : (j + 1) * nw].astype(jnp.uint32) << jnp.uint32(j)
        out = t if out is None else out | t
    return out


def pack_planes(x: jax.Array) -> jax.Array:
    """Signs of ``x`` (``x >= 0`` -> bit 1) packed along the last axis, plane order."""
    return pack_bits_planes(x >= 0)


def _isolated(live, fn, *args):
    """``fn(*args)``, computed as its own XLA kernel when ``live`` is a traced ``True``.

    XLA's CPU fusion treats packing (compares, shifts, ORs) and the popcount
    loop as cheap elementwise work and duplicates them into every consumer:
    the packing of an activation is then redone for every output element of
    the matmul reading it (32x-200x the work), and a matmul feeding a
    LayerNorm is computed twice (measured: DeiT-S attention 37 ms instead of
    3 ms). ``lax.optimization_barrier`` does not stop this on CPU (it is
    removed before fusion); a conditional does: its operands are real buffers
    and its branch is a separate computation writing its own output buffer.
    ``live`` must be a runtime boolean that is always ``True`` (``None``: no
    isolation, plain call); the other branch returns zeros and never runs.
    """
    if live is None:
        return fn(*args)
    shapes = jax.eval_shape(fn, *args)
    return lax.cond(live, fn, lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), *args)


def _popcount_sum(op, a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """``sum_w popcount(op(a_w, b_w))`` with words taken along the given axes, one word at a time."""
    a_axis, b_axis = a_axis % a.ndim, b_axis % b.ndim
    total = None
    for w in range(a.shape[a_axis]):
        aw = lax.index_in_dim(a, w, a_axis, keepdims=False)
        bw = lax.index_in_dim(b, w, b_axis, keepdims=False)
        t = lax.population_count(op(aw, bw))
        total = t if total is None else total + t
    return total.astype(jnp.int32)


def packed_matmul(
    a: jax.Array, b: jax.Array, n: int, *, live: jax.Array | None = None, epilogue=None, epilogue_args=()
) -> jax.Array:
    """+-1 matmul on packed signs: ``(..., M, W) x (W, N) -> (..., M, N)`` int32.

    ``out[..., m, j] = n - 2 * sum_w popcount(a[..., m, w] ^ b[w, j])``,
    exactly ``sign_a @ sign_b`` for the length-``n`` sign vectors the words
    hold (both packed in the same order, padding 0 in both). Accumulates one
    word at a time (see the module docstring for why). Grouped form: ``a``
    ``(G, M, W)`` and ``b`` ``(G, W, N)`` give ``(G, M, N)`` (G independent
    layers in one kernel, e.g. q, k and v).

    ``epilogue(out, *epilogue_args)``, if given, is applied inside the same
    kernel (e.g. ``alpha * out + bias``), so the integer matrix never goes to
    memory.
    """
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"word counts differ: a {a.shape}, b {b.shape}")
    post = epilogue if epilogue is not None else (lambda x, *_: x)
    if b.ndim == 2:

        def compute(a2, b, *args):
            return post(n - 2 * _popcount_sum(jnp.bitwise_xor, a2[:, None, :], b[None, :, :], 2, 1), *args)

        out = _isolated(live, compute, a.reshape(-1, a.shape[-1]), b, *epilogue_args)
        return out.reshape(a.shape[:-1] + (b.shape[1],))
    if b.ndim != 3 or a.ndim != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(f"grouped packed_matmul needs a (G, M, W) and b (G, W, N); got {a.shape}, {b.shape}")

    def grouped(a, b, *args):
        return post(n - 2 * _popcount_sum(jnp.bitwise_xor, a[:, :, None, :], b[:, None, :, :], 3, 2), *args)

    return _isolated(live, grouped, a, b, *epilogue_args)


def packed_sign_dot(
    a: jax.Array, b: jax.Array, n: int, *, live: jax.Array | None = None, epilogue=None, epilogue_args=()
) -> jax.Array:
    """Batched ``a @ b^T`` of packed signs: ``(..., P, W) x (..., Q, W) -> (..., P, Q)`` int32.

    ``n - 2 * popcount(xor)`` per pair of rows (the attention score matmul);
    ``epilogue`` as in :func:`packed_matmul`.
    """
    post = epilogue if epilogue is not None else (lambda x, *_: x)

    def compute(a, b, *args):
        return post(n - 2 * _popcount_sum(jnp.bitwise_xor, a[..., :, None, :], b[..., None, :, :], -1, -1), *args)

    return _isolated(live, compute, a, b, *epilogue_args)


def masked_sign_sum(m: jax.Array, v: jax.Array, *, live: jax.Array | None = None) -> jax.Array:
    """Batched ``m @ v^T`` of a bit mask and packed signs: ``(..., P, W) x (..., Q, W) -> (..., P, Q)`` int32.

    ``sum_k m_k v_k = 2 * popcount(m & v_bits) - popcount(m)`` for ``m`` in
    {0, 1} and ``v`` in +-1 (both packed along ``k`` in the same order;
    padding in ``m`` is 0, so padding in ``v`` never counts).
    """

    def compute(m, v):
        both = _popcount_sum(jnp.bitwise_and, m[..., :, None, :], v[..., None, :, :], -1, -1)
        ones = jnp.sum(lax.population_count(m).astype(jnp.int32), axis=-1, keepdims=True)
        return 2 * both - ones

    return _isolated(live, compute, m, v)
