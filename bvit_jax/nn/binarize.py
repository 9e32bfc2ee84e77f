"""Binarizers: the forward quantizers and their surrogate gradients.

Every binarizer here is a ``jax.custom_vjp`` whose docstring states the forward
value, the backward (surrogate) gradient, and where it comes from. All of them
use ``sign(0) = +1`` (:func:`sign`; ``jnp.sign(0)`` is 0 and would leave a
third level), and every per-channel scale is :func:`channel_alpha`: the
project's one ``sign`` and one ``alpha`` (GRS, the diagnostics and export use
them too).

Naming follows larq's quantizers: ``ste_sign`` (clipped straight-through),
``approx_sign`` (Bi-Real Net), ``weight_binarize`` (XNOR-Net / ReActNet scaled
weights) and ``elastic_binarize`` (BiT's {0, c} binarizer for attention
probabilities). The layers hold them as small named objects,
:class:`SteSign`, :class:`ApproxSign`, :class:`WeightBinarizer` and
:class:`ElasticBinarizer` (as larq's quantizer classes): each carries its
``name``, its ``packing`` (:class:`Packing`: the levels one stored bit
stands for, the bits per value and where the scale comes from), its output
``precision`` in bits (the packing's; from which each layer's ``report()``
gives its parameters' bit widths and its MACs' precision, what
:mod:`bvit_jax.nn.summary` adds up) and its custom gradient (its
``__call__``). The deployment path dispatches on the packing alone: export
stores a kernel by its kernel binarizer's packing
(:mod:`bvit_jax.deploy.kernel_formats`) and the packed forward computes a
block linear by the packings of its input and kernel binarizers, so a new
surrogate gradient with the same forward exports and runs packed unchanged,
and a new forward (``{0, 1}``, ternary) is refused there, by name, until it
has a stored form and a packed matmul.

The layers use the fused forms :func:`binary_matmul` (``x @ weight_binarize(W)``)
and :func:`elastic_matmul` (``elastic_binarize(P, c) @ V``): the same values and
the same gradients, but the forward computes the exact integer matmul of the
+-1 (and {0, 1}) operands first and applies the scale ``alpha`` (or ``c``) to
the result with one multiply, the order of operations of the packed 1-bit
inference in :mod:`bvit_jax.deploy.packed`. Summing ``+-alpha`` terms in float instead
rounds differently, and in a deep binary network an occasional value within
rounding distance of a sign threshold then flips (``docs/export.md``,
"Exactness").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

__all__ = [
    "STE_CLIP",
    "sign",
    "channel_alpha",
    "Packing",
    "PM1",
    "MASK01",
    "Binarizer",
    "SteSign",
    "ApproxSign",
    "WeightBinarizer",
    "ElasticBinarizer",
    "ste_sign",
    "approx_sign",
    "weight_binarize",
    "elastic_binarize",
    "LEVEL_MIN",
    "positive_level",
    "positive_level_inverse",
    "scale_grad",
    "lsq_grad_scale",
    "binary_matmul",
    "elastic_matmul",
    "ACTIVATION_BINARIZERS",
    "get_activation_binarizer",
    "KERNEL_BINARIZERS",
    "get_kernel_binarizer",
    "register_kernel_binarizer",
    "register_activation_binarizer",
]


# The straight-through estimators pass the gradient where |input| <= STE_CLIP (Hubara et al., 2016).
STE_CLIP = 1.0


def sign(x: jax.Array) -> jax.Array:
    """Hard sign with ``sign(0) = +1``: ``+1 if x >= 0 else -1`` (no gradient rule)."""
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@jax.custom_vjp
def ste_sign(x: jax.Array) -> jax.Array:
    """Sign with the clipped straight-through estimator.

    forward:  ``sign(x)`` with ``sign(0) = +1``
    backward: ``dL/dx = dL/dy * 1{|x| <= 1}``

    Source: Hubara et al., "Binarized Neural Networks" (2016); larq ``ste_sign``.
    """
    return sign(x)


def _ste_sign_fwd(x):
    # The backward needs only 1{|x| <= 1}: saved as a boolean (1 byte per value) instead of x.
    return sign(x), jnp.abs(x) <= STE_CLIP


def _ste_sign_bwd(inside, g):
    return (g * inside.astype(g.dtype),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


@jax.custom_vjp
def approx_sign(x: jax.Array) -> jax.Array:
    """Sign with Bi-Real Net's piecewise-polynomial ApproxSign gradient.

    forward:  ``sign(x)`` with ``sign(0) = +1``
    backward: ``dL/dx = dL/dy * d``, ``d = 2 + 2x`` on ``[-1, 0)``,
              ``2 - 2x`` on ``[0, 1)``, ``0`` elsewhere (i.e. ``max(0, 2 - 2|x|)``),
              the derivative of the quadratic approximation of sign.

    Source: Liu et al., "Bi-Real Net" (ECCV 2018), Eq. 3-4; larq ``approx_sign``.
    """
    return sign(x)


def _approx_sign_fwd(x):
    return sign(x), x


def _approx_sign_bwd(x, g):
    return (g * jnp.maximum(0.0, 2.0 - 2.0 * jnp.abs(x)).astype(g.dtype),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


def channel_alpha(x: jax.Array) -> jax.Array:
    """Per-channel scale ``alpha = mean(|x|)`` over every axis but the last, keepdims.

    For a ``(in, out)`` kernel: XNOR-Net's weight scale, one per output
    channel, the L1-optimal ``alpha`` of ``W ~ alpha * sign(W)`` (Rastegari et
    al., ECCV 2016, Eq. 6). For activations ``(..., channels)``: the same
    optimum per channel.
    """
    return jnp.mean(jnp.abs(x), axis=tuple(range(x.ndim - 1)), keepdims=True)


def weight_binarize(w: jax.Array, *, scale: bool = True) -> jax.Array:
    """Scaled weight binarizer for a ``(in, out)`` kernel.

    forward:  ``W_b = alpha * sign(W)``, ``alpha = mean_in(|W|)`` per output
              channel (``alpha = 1`` when ``scale=False``)
    backward: ``dL/dW = alpha * dL/dW_b * 1{|W| <= 1}`` (clipped straight-through;
              ``alpha`` is treated as a constant, as ReActNet detaches it)

    Sources: Rastegari et al., "XNOR-Net" (ECCV 2016) for the scale;
    Liu et al., "ReActNet" (ECCV 2020) for the detached scale.
    """
    b = ste_sign(w)
    if not scale:
        return b
    return jax.lax.stop_gradient(channel_alpha(w)) * b


@jax.custom_vjp
def elastic_binarize(p: jax.Array, c: jax.Array) -> jax.Array:
    """{0, c} binarizer with a learnable level ``c`` (for attention probabilities).

    forward:  ``q = c * clip(round(p / c), 0, 1)`` (``c > 0``; ``round`` is
              half-to-even, so ``p = c/2`` maps to 0)
    backward: ``dL/dp = dL/dq * 1{0 <= p <= c}`` (straight-through inside the range)
              ``dL/dc = sum dL/dq * (round(p/c) - p/c)`` for ``0 <= p/c <= 1``,
              ``1`` where ``p/c > 1`` and ``0`` where ``p/c < 0`` (LSQ's step-size
              gradient; summed over all elements since ``c`` is shared).

    Sources: Liu et al., "BiT: Robustly Binarized Multi-distilled Transformer"
    (NeurIPS 2022), elastic binarization; Esser et al., "LSQ" (ICLR 2020).
    """
    return c * jnp.clip(jnp.round(p / c), 0, 1)


def _elastic_fwd(p, c):
    r = p / c  # saved instead of p: the backward needs p / c, not p (one division less)
    return c * jnp.clip(jnp.round(r), 0, 1), (r, c)


def _elastic_bwd(res, g):
    r, c = res
    inside = (r >= 0) & (r <= 1)
    gp = g * inside.astype(g.dtype)
    dq_dc = jnp.where(inside, jnp.round(r) - r, jnp.where(r > 1, 1.0, 0.0))
    gc = jnp.sum(g * dq_dc.astype(g.dtype))
    return gp, jnp.reshape(gc, jnp.shape(c)).astype(c.dtype)


elastic_binarize.defvjp(_elastic_fwd, _elastic_bwd)


# ----------------------------------------------------------------------------- the level c > 0

LEVEL_MIN = 1e-6
"""Floor of the {0, c} level: ``c >= LEVEL_MIN`` whatever its raw parameter (see :func:`positive_level`)."""


def positive_level(raw: jax.Array) -> jax.Array:
    """The {0, c} level from its unconstrained parameter: ``c = LEVEL_MIN + softplus(raw)``.

    ``softplus(raw) = log(1 + exp(raw))`` is positive and, unlike ``exp``, grows
    only linearly (``~ raw`` for large ``raw``), so no optimizer step can make
    ``c`` zero, negative or infinite: a huge step down leaves
    ``softplus(raw) = 0`` in float32 and ``c = LEVEL_MIN`` (``p / c`` stays
    finite for probabilities ``p <= 1``), a huge step up gives a large finite
    ``c``. ``dc/d raw = sigmoid(raw)``; for small ``c``, ``softplus(raw) ~
    exp(raw)``, so gradient steps on ``raw`` change ``c`` multiplicatively.
    """
    raw = jnp.asarray(raw)
    return (LEVEL_MIN + jax.nn.softplus(raw)).astype(raw.dtype)


def positive_level_inverse(c: float) -> float:
    """The raw parameter with ``positive_level(raw) = c``: ``raw = log(expm1(c - LEVEL_MIN))`` (float64).

    Raises ``ValueError`` unless ``c > LEVEL_MIN``.
    """
    c = float(c)
    if not (c > LEVEL_MIN) or not math.isfinite(c):
        raise ValueError(f"the attention level c must be a finite number > {LEVEL_MIN}, got {c}")
    s = c - LEVEL_MIN
    return s + math.log(-math.expm1(-s))  # log(expm1(s)) without overflow for large s


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_grad(x: jax.Array, g: float) -> jax.Array:
    """Identity with a scaled gradient: forward ``y = x`` (bit for bit), backward ``dL/dx = g * dL/dy``.

    The LSQ gradient scale (Esser et al., "Learned Step Size Quantization",
    ICLR 2020, Sec. 2.2). Unlike ``x * g + stop_gradient(x - x * g)`` the
    forward value is exactly ``x``.
    """
    return x


def _scale_grad_fwd(x, g):
    return x, None


def _scale_grad_bwd(g, _, ct):
    return ((ct * g).astype(ct.dtype),)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def lsq_grad_scale(num_elements: int, q_p: int = 1) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N * Q_P)``.

    ``N``: elements quantized with this step (per example); ``Q_P``: number of
    positive levels (1 for the {0, c} binarizer).
    """
    return 1.0 / math.sqrt(num_elements * q_p)


# ----------------------------------------------------------------------------- fused forms


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def binary_matmul(x: jax.Array, w: jax.Array, scale: bool = True) -> jax.Array:
    """``x @ weight_binarize(W)`` computed as ``(x @ sign(W)) * alpha``, for ``x`` ``(M, in)``, ``W`` ``(in, out)``.

    forward:  ``y = (x @ sign(W)) * alpha``, ``alpha = mean_in(|W|)`` per output
              channel (no multiply when ``scale=False``). The matmul accumulates
              in float32 (``preferred_element_type``); ``y`` has ``x``'s dtype.
              For ``x`` in +-1 the matmul is an exact integer in float32 (for
              ``in < 2**24``), so ``y`` is that integer times ``alpha`` with one
              rounding: bit for bit the packed layer's
              ``(in - 2*popcount(xor(x_bits, W_bits))) * alpha``.
    backward: those of ``x @ W_b``, ``W_b = alpha * sign(W)`` with the
              detached scale and clipped straight-through of
              :func:`weight_binarize`, by the same operations::

                  dL/dx = g @ W_b^T,    dL/dW = alpha * (x^T @ g) * 1{|W| <= 1}

    ``W`` is the float32 latent kernel; ``sign(W)`` (and ``W_b`` in the
    backward) are cast to ``x.dtype`` for the matmuls, as the layer cast
    ``W_b`` before.
    """
    return _binary_matmul_fwd(x, w, scale)[0]


def _binary_matmul_fwd(x, w, scale):
    alpha = channel_alpha(w) if scale else None  # (1, out), float32
    y = jnp.dot(x, sign(w).astype(x.dtype), preferred_element_type=jnp.float32)
    if scale:
        y = y * alpha
    return y.astype(x.dtype), (x, w, alpha)


def _binary_matmul_bwd(scale, res, g):
    x, w, alpha = res
    b = sign(w)
    wb = alpha * b if scale else b
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, wb.astype(x.dtype), (((1,), (1,)), ((), ())))  # g @ W_b^T
    # x^T @ g, accumulated and returned in float32 (the latent kernel's dtype) whatever the compute dtype
    dwb = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(w.dtype)
    if scale:
        dwb = alpha * dwb
    dw = dwb * (jnp.abs(w) <= STE_CLIP).astype(dwb.dtype)
    return dx, dw


binary_matmul.defvjp(_binary_matmul_fwd, _binary_matmul_bwd)


@jax.custom_vjp
def elastic_matmul(p: jax.Array, c: jax.Array, v: jax.Array) -> jax.Array:
    """``elastic_binarize(P, c) @ V`` computed as ``(level @ V) * c`` (per head: ``(..., q, k) x (..., k, d)``).

    forward:  ``level = clip(round(P / c), 0, 1)`` in {0, 1} (so
              ``elastic_binarize(P, c) = c * level``); ``out = (level @ V) * c``,
              the matmul accumulating in float32 and ``out`` in ``V``'s dtype.
              For ``V`` in +-1 the matmul is an exact integer in float32, so
              ``out`` is that integer times ``c`` with one rounding: bit for bit
              the packed ``c * (2*popcount(m & v_bits) - popcount(m))``.
    backward: those of ``Q @ V`` with ``Q = elastic_binarize(P, c)`` (see
              there), by the same operations::

                  dL/dQ = g @ V^T,   dL/dV = Q^T @ g,
                  dL/dP = dL/dQ * 1{0 <= P <= c},
                  dL/dc = sum dL/dQ * (round(P/c) - P/c | 1 if P/c > 1 | 0 if P/c < 0)
    """
    return _elastic_matmul_fwd(p, c, v)[0]


def _elastic_matmul_fwd(p, c, v):
    r = p / c
    level = jnp.clip(jnp.round(r), 0, 1)
    out = jnp.einsum("...qk,...kd->...qd", level.astype(v.dtype), v, preferred_element_type=jnp.float32) * c
    return out.astype(v.dtype), (r, c, v)


def _elastic_matmul_bwd(res, g):
    r, c, v = res
    q = (c * jnp.clip(jnp.round(r), 0, 1)).astype(v.dtype)  # elastic_binarize(P, c), recomputed
    g = g.astype(v.dtype)
    dq = jnp.einsum("...qd,...kd->...qk", g, v).astype(r.dtype)
    dv = jnp.einsum("...qk,...qd->...kd", q, g)
    gp, gc = _elastic_bwd((r, c), dq)
    return gp, gc, dv


elastic_matmul.defvjp(_elastic_matmul_fwd, _elastic_matmul_bwd)


# ----------------------------------------------------------------------------- binarizer objects


PM1 = "pm1"
"""Levels +-1: a stored bit is ``[v >= 0]`` (``sign(0) = +1``), the value ``2 * bit - 1``."""
MASK01 = "01"
"""Levels {0, 1}: a stored bit is ``[v > 0]``, the value the bit itself."""

SCALES = (None, "channel_mean_abs", "parameter")
"""Where a packing's scale comes from: none; ``alpha = mean|W|`` per output channel
(:func:`channel_alpha`, computed once at export); a learned parameter of the layer (the level ``c``)."""


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a binarizer's output is stored and computed with in the 1-bit model.

    A value is ``scale * level(bits)``: ``levels`` names the values one stored
    code stands for before the scale (:data:`PM1`: +-1, the XNOR-popcount
    operand; :data:`MASK01`: {0, 1}, the AND-popcount operand), ``bits`` the
    bits per value, ``scale`` where the float scale comes from
    (:data:`SCALES`). Export's stored form of a kernel and the packed forward's
    matmul of a block linear are looked up by these values (larq declares a
    quantizer's precision the same way; here the declaration also says what
    the deployment path must do with it).
    """

    levels: str
    bits: int = 1
    scale: str | None = None

    def __post_init__(self):
        if self.levels not in (PM1, MASK01) and self.bits == 1:
            raise ValueError(f"a 1-bit packing has levels {PM1!r} or {MASK01!r}, got {self.levels!r}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown packing scale {self.scale!r}; choose one of {SCALES}")


class Binarizer:
    """A named binarizer: ``__call__`` is its forward with its custom gradient.

    ``name`` names it (for the activation binarizers: their config name,
    ``model.act_binarizer``); ``packing`` (:class:`Packing`) how its output is
    stored and multiplied in the 1-bit model; ``precision`` the bits of each
    output value, the packing's (1 for every binarizer here: +-1, +-alpha or
    {0, c}). Subclasses are frozen dataclasses, so they compare by value and
    can sit in a module's static attributes (and in the jit cache key) like a
    string. A subclass that changes only the backward (a new surrogate
    gradient) keeps its parent's packing; one with a new forward declares its own.
    """

    name: ClassVar[str]
    packing: ClassVar[Packing] = Packing(PM1)

    @property
    def precision(self) -> int:
        """Bits per output value in the 1-bit model (``packing.bits``)."""
        return self.packing.bits


@dataclasses.dataclass(frozen=True)
class SteSign(Binarizer):
    """Activation sign with the clipped straight-through gradient (:func:`ste_sign`; Hubara et al. 2016)."""

    name: ClassVar[str] = "ste"

    def __call__(self, x: jax.Array) -> jax.Array:
        return ste_sign(x)


@dataclasses.dataclass(frozen=True)
class ApproxSign(Binarizer):
    """Activation sign with Bi-Real Net's ApproxSign gradient ``max(0, 2 - 2|x|)`` (:func:`approx_sign`)."""

    name: ClassVar[str] = "approx"

    def __call__(self, x: jax.Array) -> jax.Array:
        return approx_sign(x)


@dataclasses.dataclass(frozen=True)
class WeightBinarizer(Binarizer):
    """Kernel binarizer ``W_b = alpha * sign(W)`` (``alpha = 1`` when ``scale=False``), :func:`weight_binarize`.

    ``alpha`` is :func:`channel_alpha` per output channel, detached in the
    backward (ReActNet); the kernel's gradient is the clipped straight-through
    ``alpha * dL/dW_b * 1{|W| <= 1}``. :meth:`matmul` is the fused product the
    layers use (:func:`binary_matmul`).
    """

    scale: bool = True
    name: ClassVar[str] = "weight"
    # The straight-through gradient reaches a latent weight only where |W| <= ste_window (math.inf: everywhere);
    # a subclass with another gradient states its own (the trainer logs the share outside it).
    ste_window: ClassVar[float] = STE_CLIP

    @property
    def packing(self) -> Packing:  # type: ignore[override]
        """+-1 bits with ``alpha = mean|W|`` per output channel (no scale without ``scale``)."""
        return Packing(PM1, scale="channel_mean_abs" if self.scale else None)

    def __call__(self, w: jax.Array) -> jax.Array:
        return weight_binarize(w, scale=self.scale)

    def alpha(self, w: jax.Array) -> jax.Array:
        """The per-output-channel scale, shape ``(out,)``, detached: ``mean_in|W|``, or ones without ``scale``."""
        if not self.scale:
            return jnp.ones(w.shape[-1:], jnp.float32)
        return jax.lax.stop_gradient(channel_alpha(w)).reshape(w.shape[-1:])

    def matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """``x @ W_b`` as ``(x @ sign(W)) * alpha`` (:func:`binary_matmul`)."""
        return binary_matmul(x, w, self.scale)

    def unscaled_matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """``x @ sign(W)``, the exact integer matmul without ``alpha``; gradient clipped straight-through to ``W``."""
        return binary_matmul(x, w, False)


@dataclasses.dataclass(frozen=True)
class ElasticBinarizer(Binarizer):
    """{0, c} binarizer of attention probabilities with a learnable level ``c`` (:func:`elastic_binarize`; BiT)."""

    name: ClassVar[str] = "elastic"
    packing: ClassVar[Packing] = Packing(MASK01, scale="parameter")

    def __call__(self, p: jax.Array, c: jax.Array) -> jax.Array:
        return elastic_binarize(p, c)

    def matmul(self, p: jax.Array, c: jax.Array, v: jax.Array) -> jax.Array:
        """``elastic_binarize(P, c) @ V`` as ``(level @ V) * c`` (:func:`elastic_matmul`)."""
        return elastic_matmul(p, c, v)


ACTIVATION_BINARIZERS: dict[str, Binarizer] = {b.name: b for b in (SteSign(), ApproxSign())}
"""The activation binarizers a config can name (``model.act_binarizer``): add one with
:func:`register_activation_binarizer`."""


def register_activation_binarizer(binarizer: Binarizer) -> Binarizer:
    """Make ``binarizer`` selectable as ``model.act_binarizer = binarizer.name``; returns it.

    The name must be new (``ValueError`` otherwise). Training, the summary,
    export and the packed forward then use it through its ``__call__``,
    ``precision`` and ``packing``: a surrogate gradient with a +-1 forward
    (``packing = Packing(PM1)``, the default) needs nothing else.
    """
    if not isinstance(binarizer, Binarizer):
        raise TypeError(f"expected a Binarizer instance, got {type(binarizer).__name__}")
    if binarizer.name in ACTIVATION_BINARIZERS:
        raise ValueError(f"an activation binarizer named {binarizer.name!r} exists already")
    ACTIVATION_BINARIZERS[binarizer.name] = binarizer
    return binarizer


KERNEL_BINARIZERS: dict[str, type[WeightBinarizer]] = {WeightBinarizer.name: WeightBinarizer}
"""The kernel binarizers a config can name (``model.kernel_binarizer``), each a :class:`WeightBinarizer`
class built with ``scale=model.weight_scale``: add one with :func:`register_kernel_binarizer`."""


def register_kernel_binarizer(cls: type[WeightBinarizer]) -> type[WeightBinarizer]:
    """Make the kernel binarizer class ``cls`` selectable as ``model.kernel_binarizer = cls.name``; returns it.

    ``cls`` subclasses :class:`WeightBinarizer` (a binary linear calls its
    ``matmul``, ``unscaled_matmul`` and ``alpha``) and its name must be new
    (``ValueError`` otherwise). A kernel binarizer with the ``alpha * sign(W)``
    forward and a new gradient keeps the parent's packing and exports and runs
    packed with nothing else added; one with another forward declares its
    :class:`Packing`, which export refuses until a kernel format stores it
    (:mod:`bvit_jax.deploy.kernel_formats`). Usable as a class decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, WeightBinarizer)):
        raise TypeError(f"expected a WeightBinarizer subclass, got {cls!r}")
    if cls.name in KERNEL_BINARIZERS:
        raise ValueError(f"a kernel binarizer named {cls.name!r} exists already")
    KERNEL_BINARIZERS[cls.name] = cls
    return cls


def get_kernel_binarizer(name: str, scale: bool = True) -> WeightBinarizer:
    """The kernel binarizer of a config name (``'weight'``, ``model.kernel_binarizer``), with ``scale``."""
    try:
        return KERNEL_BINARIZERS[name](scale=scale)
    except KeyError:
        raise ValueError(
            f"Unknown kernel binarizer {name!r}; choose one of "
            f"{sorted(KERNEL_BINARIZERS)} (config field model.overrides.kernel_binarizer)."
        ) from None


def get_activation_binarizer(name: str) -> Binarizer:
    """The activation binarizer of a config name (``'ste'`` or ``'approx'``, ``model.act_binarizer``)."""
    try:
        return ACTIVATION_BINARIZERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown activation binarizer {name!r}; choose one of "
            f"{sorted(ACTIVATION_BINARIZERS)} (config field model.overrides.act_binarizer)."
        ) from None
