"""Bit packing, XNOR-popcount ops and the packed (truly 1-bit) ViT forward.

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

Packed forward
==============

:func:`packed_forward` reproduces :class:`bvit_jax.models.VisionTransformer`
for a model whose block linears binarize weights *and* activations
(every binary preset), from a :class:`PackedModel`:

* block linears: ``LN((n - 2*popcount(xor(x_bits, W_bits))) * alpha + b)``
  plus the real-valued shortcut (``branch_norm='affine'``: no LN, the affine
  folded into ``alpha`` and ``b`` at export), ``x_bits = [x - shift(x) >= 0]`` (every
  ``asm_mode``: the shift's statistic is :func:`bvit_jax.layers.asm_statistic`,
  the model's own function);
* binary attention (``binary_attention``): scores
  ``Q_b K_b^T = d - 2*popcount(xor(q_bits, k_bits))`` per head (``d`` the head
  width); the {0, c} probabilities as a bit mask ``m``; and
  ``P_b V_b = c * (2*popcount(m & v_bits) - popcount(m))`` (for ``m`` in
  {0, 1} and ``v`` in +-1: ``sum_k m_k v_k = #(m=1, v=+1) - #(m=1, v=-1)``);
  the softmax between them stays float;
* patch embedding, tokens, LayerNorms, RPReLU/GELU, head: float32, as in the
  model.

Integer dot products are exact, and the training-time model does the same
float arithmetic around them: it computes ``(x_b @ sign(W)) * alpha`` and
``(level @ V_b) * c`` (exact integer matmuls in float32, then one multiply;
:func:`bvit_jax.binarize.binary_matmul`, :func:`bvit_jax.binarize.elastic_matmul`)
and its LayerNorms with the function used here
(:func:`bvit_jax.layers.layer_norm`). Every sign therefore sees the same
float32 value in both forwards, and the logits agree bit for bit on CPU
(measured on DeiT-S; ``docs/export.md``, "Exactness"). Summing ``+-alpha``
terms in float instead (the model before) rounds differently, and in a deep
model an occasional value within rounding distance of a sign threshold flips.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax

from bvit_jax.binarize import positive_level
from bvit_jax.layers import BinaryOptions, asm_statistic, layer_norm, rounded
from bvit_jax.models import ViTConfig

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
    "PackedModel",
    "check_packable",
    "packed_linear_block",
    "packed_forward",
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


# --------------------------------------------------------------------------
# The packed model and its forward.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PackedModel:
    """A model ready for :func:`packed_forward` (what :func:`bvit_jax.export.load_packed` returns).

    Attributes:
      cfg: the architecture.
      opts: the binarization switches (``dtype`` float32: packed inference runs in float32).
      tensors: flat ``{path: array}``. Binary linears ``P`` (e.g.
        ``blocks/0/attn/q/linear``) hold ``P/kernel_bits`` (uint32
        ``(ceil(in/32), out)``, **plane** order), ``P/alpha`` (``(out,)``) and
        ``P/bias`` (with a folded branch normalisation, ``branch_norm`` not
        ``'layernorm'``: the folded ``alpha'`` and ``b'``, and no ``.../norm/``
        tensors); every other parameter keeps its model path and float32 value.
      header: the file header (variant, preset, preprocessing, ...).
    """

    cfg: ViTConfig
    opts: BinaryOptions
    tensors: Mapping[str, jax.Array]
    header: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def __call__(self, images: jax.Array) -> jax.Array:
        return packed_forward(self, images)


def check_packable(opts: BinaryOptions) -> None:
    """Raise ``ValueError`` unless the block linears are binary in weights and activations."""
    if not (opts.binarize_weights and opts.binarize_acts):
        raise ValueError(
            "only models whose block linears binarize both weights and activations can be packed "
            f"(XNOR-popcount needs +-1 on both sides); got binarize_weights={opts.binarize_weights}, "
            f"binarize_acts={opts.binarize_acts} (preset 'fp' has no binary layers)"
        )


def _layer_norm(x, t, prefix, eps=1e-6):
    """The model's LayerNorm (:func:`bvit_jax.layers.layer_norm`, the same function)."""
    return layer_norm(x, t[prefix + "/scale"], t[prefix + "/bias"], eps)


def _stacked(t, names, suffix):
    """``stack([t[n + suffix] for n in names])``, or None when the layers have no such parameter."""
    vals = [t.get(n + suffix) for n in names]
    if all(v is None for v in vals):
        return None
    if any(v is None for v in vals):
        raise ValueError(f"inconsistent parameters {[n + suffix for n in names]}")
    return jnp.stack(vals)


def _shifted(x, t, names, *, shared: bool, mode: str = "token_mean", heads: int = 1):
    """``x - shift(x)`` for G sign activations, ``shift = beta + gamma * m(x)``.

    ``m`` is :func:`bvit_jax.layers.asm_statistic` of ``mode`` (the model's
    ``asm_mode``; ``heads``: the attention heads the channels belong to, 1 at
    the block linears). ``shared``: all G read the same ``x`` ``(B, N, C)``
    (the statistic is computed once); else ``x`` is ``(G, B, N, C)``, one
    input per activation. Returns ``(G, B, N, C)``, or ``x`` unchanged
    (``(B, N, C)``) when there is no shift. Same operations, in the same
    order, as :class:`bvit_jax.layers.ActivationShift`.
    """
    beta, gamma = _stacked(t, names, "/shift/beta"), _stacked(t, names, "/shift/gamma")
    if beta is None and gamma is None:
        return x
    g = len(names)
    shift = jnp.zeros((g, 1, 1, x.shape[-1]), x.dtype)
    if beta is not None:
        shift = shift + beta[:, None, None, :]
    if gamma is not None:
        stat = asm_statistic(x, mode, heads)
        shift = shift + gamma[:, None, None, :] * (stat[None] if shared else stat)
    return (x[None] if shared else x) - shift


def _match_width(x, width):
    c = x.shape[-1]
    if c == width:
        return x
    if width % c == 0:
        return jnp.tile(x, (1,) * (x.ndim - 1) + (width // c,))
    return jnp.mean(rearrange(x, "... (k c) -> ... k c", c=width), axis=-2)


def _record(sink, names, shifted):
    """With a ``sink`` dict: ``sink[name] = shifted >= 0`` (the sign bits) for each of the G names.

    ``shifted`` is ``(G, ...)``, one input per name, or a single input shared by all.
    """
    if sink is None:
        return
    for i, name in enumerate(names):
        sink[name] = (shifted[i] if shifted.ndim == 4 else shifted) >= 0


def _linear_blocks(x, t, prefixes, opts, live=None, sink=None):
    """G packed :class:`bvit_jax.layers.LinearBlock` s on one input ``x`` ``(B, N, K)`` -> ``(G, B, N, out)``.

    Each: ``match(x) + LN((K - 2*popcount(xor(x_bits, W_bits))) * alpha + b)``
    with ``x_bits = [x - shift(x) >= 0]``; with a folded branch normalisation
    (``branch_norm`` not ``'layernorm'``) ``match(x) + (K - 2*popcount(...)) * alpha' + b'``,
    ``alpha'``, ``b'`` the stored folded scale and bias. q, k and v run as one grouped kernel.
    """
    lins = [p + "/linear" for p in prefixes]
    g, (b, n_tok, k) = len(prefixes), x.shape
    shifted = _shifted(x, t, [p + "/act" for p in lins], shared=True, mode=opts.asm_mode)
    _record(sink, [p + "/act" for p in lins], shifted)
    bits = pack_planes(shifted)
    if bits.ndim == 3:  # no shift: one packing serves every layer
        bits = jnp.broadcast_to(bits[None], (g,) + bits.shape)
    kernels = jnp.stack([t[p + "/kernel_bits"] for p in lins])
    alpha, bias = _stacked(t, lins, "/alpha"), _stacked(t, lins, "/bias")
    folded = opts.linear_shortcut and opts.branch_norm != "layernorm"

    def epilogue(acc, al, bi):
        prod = acc.astype(jnp.float32) * al[:, None, :]
        # folded branch normalisation: the product rounded before the add, as the model computes it
        return (rounded(prod) if folded else prod) + bi[:, None, :]

    y = packed_matmul(
        bits.reshape(g, b * n_tok, -1), kernels, k, live=live, epilogue=epilogue, epilogue_args=(alpha, bias)
    ).reshape(g, b, n_tok, -1)
    if not opts.linear_shortcut:
        return y
    if opts.branch_norm != "layernorm":  # folded into alpha and bias at export: no normalisation here
        return _match_width(x, y.shape[-1])[None] + y
    scale, nbias = _stacked(t, prefixes, "/norm/scale"), _stacked(t, prefixes, "/norm/bias")
    return _match_width(x, y.shape[-1])[None] + layer_norm(y, scale[:, None, None, :], nbias[:, None, None, :])


def packed_linear_block(x, t, prefix, opts, live=None, sink=None):
    """One packed :class:`bvit_jax.layers.LinearBlock` on ``x`` ``(B, N, K)``: the layer of a ``.bvit`` file.

    ``t`` maps tensor names to arrays as a :class:`PackedModel` holds them
    (``prefix + "/linear/kernel_bits"`` in plane order, ``.../alpha``,
    ``.../bias``, the activation shift under ``.../act/``, and with
    ``opts.linear_shortcut`` the LayerNorm ``prefix + "/norm/..."``).
    Returns ``match(x) + LN((K - 2*popcount(xor(x_bits, W_bits))) * alpha + b)``
    (without the shortcut and LN when ``opts.linear_shortcut`` is off). With
    ``opts.branch_norm='affine'`` the file stores ``alpha' = alpha * scale``
    and ``b' = b * scale + bias`` in ``.../alpha`` and ``.../bias``
    (:func:`bvit_jax.layers.fold_branch_affine`) and no ``norm``; the layer is
    ``match(x) + (K - 2*popcount(...)) * alpha' + b'``, no normalisation at run time.
    ``live``: None, or a runtime ``True`` that runs the popcount matmul as its
    own XLA computation (as in :func:`packed_matmul`); ``sink``: None, or a
    dict that receives the sign bits under ``prefix + "/linear/act"`` (what
    :func:`packed_forward` returns with ``capture=True``).
    """
    return _linear_blocks(x, t, [prefix], opts, live, sink)[0]


def _attention(x, t, prefix, cfg, opts, attention, live=None, sink=None):
    h = cfg.num_heads
    names = [f"{prefix}/{n}" for n in ("q", "k", "v")]
    qkv = _linear_blocks(x, t, names, opts, live, sink)  # (3, B, N, D)
    if not opts.binary_attention:
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=h) for a in qkv)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        return packed_linear_block(rearrange(out, "b h n d -> b n (h d)"), t, prefix + "/proj", opts, live, sink)

    s = _shifted(qkv, t, [n + "_sign" for n in names], shared=False, mode=opts.asm_mode, heads=h)  # (3, B, N, D)
    _record(sink, [n + "_sign" for n in names], s)
    d = qkv.shape[-1] // h
    c = positive_level(t[prefix + "/attn_level_raw"])  # c = LEVEL_MIN + softplus(raw), as Attention.level()
    scale = jnp.sqrt(d).astype(jnp.float32)
    if attention == "popcount":
        qk = pack_planes(rearrange(s[:2], "g b n (h d) -> g b h n d", h=h))
        scores = packed_sign_dot(
            qk[0], qk[1], d, live=live, epilogue=lambda acc, sc: acc.astype(jnp.float32) / sc, epilogue_args=(scale,)
        )
    else:  # float +-1 matmul, as in the model
        qf, kf = (jnp.where(rearrange(a, "b n (h d) -> b h n d", h=h) >= 0, 1.0, -1.0) for a in s[:2])
        scores = jnp.einsum("bhqd,bhkd->bhqk", qf, kf) / scale
    probs = jax.nn.softmax(scores, axis=-1)
    level = jnp.clip(jnp.round(probs / c), 0, 1)  # elastic_binarize(probs, c) / c, in {0, 1}
    if attention == "popcount":
        mask = pack_bits_planes(level > 0)  # (b, h, q, ceil(N/32)), along keys
        vb = pack_planes(rearrange(s[2], "b n (h d) -> b h d n", h=h))  # along keys
        out = c * masked_sign_sum(mask, vb, live=live).astype(jnp.float32)
    else:
        vf = jnp.where(rearrange(s[2], "b n (h d) -> b h n d", h=h) >= 0, 1.0, -1.0)
        out = jnp.einsum("bhqk,bhkd->bhqd", level, vf) * c
    return packed_linear_block(rearrange(out, "b h n d -> b n (h d)"), t, prefix + "/proj", opts, live, sink)


def _mlp(x, t, prefix, opts, live=None, sink=None):
    hdn = packed_linear_block(x, t, prefix + "/fc1", opts, live, sink)
    if opts.rprelu:
        z = hdn - t[prefix + "/act/gamma"]
        hdn = jnp.where(z >= 0, z, t[prefix + "/act/slope"] * z) + t[prefix + "/act/zeta"]
    else:
        hdn = jax.nn.gelu(hdn, approximate=False)
    return packed_linear_block(hdn, t, prefix + "/fc2", opts, live, sink)


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "attention", "capture"))
def _forward(tensors, images, live, *, cfg: ViTConfig, opts: BinaryOptions, attention: str, capture: bool = False):
    t = tensors
    sink = {} if capture else None
    p = cfg.patch_size
    x = (
        lax.conv_general_dilated(
            images.astype(jnp.float32),
            t["patch_embed/kernel"],
            (p, p),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        + t["patch_embed/bias"]
    )
    x = rearrange(x, "b h w d -> b (h w) d")
    cls = jnp.broadcast_to(t["cls_token"], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + t["pos_embed"]
    for i in range(cfg.depth):
        b = f"blocks/{i}"
        x = x + _attention(_layer_norm(x, t, b + "/norm1"), t, b + "/attn", cfg, opts, attention, live, sink)
        x = x + _mlp(_layer_norm(x, t, b + "/norm2"), t, b + "/mlp", opts, live, sink)
    feat = _layer_norm(x[:, 0], t, "norm")
    logits = jnp.dot(feat, t["head/kernel"]) + t["head/bias"]
    return (logits, sink) if capture else logits


def packed_forward(packed: PackedModel, images, *, attention: str = "popcount", capture: bool = False):
    """Logits of a packed model, ``(B, num_classes)`` float32, under ``jax.jit``.

    Args:
      packed: a :class:`PackedModel` (:func:`bvit_jax.export.load_packed` or
        :func:`bvit_jax.export.pack_model`).
      images: ``(B, image_size, image_size, in_channels)``, preprocessed as for
        the model (normalised floats).
      attention: binary attention matmuls by ``"popcount"`` (default) or by a
        float matmul of the +-1 / {0, c} operands (``"float"``, for comparison).
      capture: also return the sign bits: ``(logits, {path: bits})`` with
        ``bits = x - shift(x) >= 0`` (bool, the input's shape) for every sign,
        keyed like ``model(images, capture=True)`` (e.g.
        ``"blocks/0/attn/q/linear/act"``, ``"blocks/0/attn/q_sign"``).

    Equals ``model(images)`` of the float32 training-time model: the model
    computes its binary matmuls as exact integers scaled afterwards
    (:func:`bvit_jax.binarize.binary_matmul`,
    :func:`bvit_jax.binarize.elastic_matmul`) and its LayerNorms with the same
    function as this forward, so every sign and the logits agree (bit for bit
    on CPU, where it is measured; ``docs/export.md``, "Exactness").
    """
    cfg = packed.cfg
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
        raise ValueError(
            f"expected images of shape (B, {cfg.image_size}, {cfg.image_size}, {cfg.in_channels}), got {images.shape}"
        )
    if attention not in ("popcount", "float"):
        raise ValueError(f"attention must be 'popcount' or 'float', got {attention!r}")
    check_packable(packed.opts)
    # ``live``: a runtime True that lets the popcount kernels run as separate XLA
    # computations (see ``_isolated``).
    return _forward(
        dict(packed.tensors), images, np.bool_(True), cfg=cfg, opts=packed.opts, attention=attention, capture=capture
    )
