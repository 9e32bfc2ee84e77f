"""The packed (truly 1-bit) ViT forward: a :class:`PackedModel` run with XNOR-popcount matmuls.

The bit packing and popcount ops, with their bit conventions (standard and
plane order), are :mod:`bvit_jax.deploy.bitops`; the file a :class:`PackedModel` is
read from, :mod:`bvit_jax.deploy.bvit_format`, and :mod:`bvit_jax.deploy.export` writes and
loads it. A binary linear layer runs there as
``y = alpha * (n - 2 * popcount(xor(x_bits, W_bits))) + b``, the integer dot
product of two +-1 vectors exact (the identity is in :mod:`bvit_jax.deploy.bitops`).

Packed forward
==============

:func:`packed_forward` reproduces :class:`bvit_jax.nn.models.VisionTransformer`
for a model whose block linears binarize weights *and* activations
(every binary preset), from a :class:`PackedModel`:

* block linears: ``LN((n - 2*popcount(xor(x_bits, W_bits))) * alpha + b)``
  plus the real-valued shortcut (``branch_norm='affine'`` or ``'batchnorm'``:
  no LN, the normalisation's inference map folded into ``alpha`` and ``b`` at
  export), ``x_bits = [x - shift(x) >= 0]`` (every ``asm_mode``: the shift's
  statistic is :func:`bvit_jax.nn.activations.asm_statistic`, the model's own function);
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
:func:`bvit_jax.nn.binarize.binary_matmul`, :func:`bvit_jax.nn.binarize.elastic_matmul`)
and its LayerNorms with the function used here
(:func:`bvit_jax.nn.fused_ops.layer_norm`). Every sign therefore sees the same
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
from flax import nnx
from jax import lax

from bvit_jax.deploy import native as native_ops
from bvit_jax.deploy.bitops import masked_sign_sum, pack_bits_planes, pack_planes, packed_matmul, packed_sign_dot
from bvit_jax.nn.activations import asm_statistic
from bvit_jax.nn.attention import Attention
from bvit_jax.nn.binarize import MASK01, PM1, positive_level, sign
from bvit_jax.nn.fused_ops import layer_norm, rounded, rprelu
from bvit_jax.nn.linear import BinaryLinear, match_width
from bvit_jax.nn.models import ViTConfig, abstract_model
from bvit_jax.nn.options import BinaryOptions

__all__ = [
    "BACKENDS",
    "PackedModel",
    "resolve_backend",
    "PACKED_MATMULS",
    "UNPACKED_SWITCHES",
    "check_packable",
    "packed_linear_block",
    "packed_forward",
]


# --------------------------------------------------------------------------
# The packed model and its forward.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PackedModel:
    """A model ready for :func:`packed_forward` (what :func:`bvit_jax.deploy.export.load_packed` returns).

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


PACKED_MATMULS: dict[str, frozenset[tuple[str, str]]] = {
    "block linear": frozenset({(PM1, PM1)}),  # n - 2 * popcount(xor(x_bits, W_bits))
    "attention scores": frozenset({(PM1, PM1)}),  # Q_b K_b^T: d - 2 * popcount(xor(q_bits, k_bits))
    "attention values": frozenset({(MASK01, PM1)}),  # P_b V_b: 2 * popcount(m & v_bits) - popcount(m)
}
"""The ``(left, right)`` packing levels each binary matmul of :func:`packed_forward` computes exactly."""


def _levels(binarizer) -> str | None:
    """A binarizer's packed levels if it packs to 1 bit, else None (a float operand)."""
    return binarizer.packing.levels if binarizer is not None and binarizer.packing.bits == 1 else None


def _binary_matmuls(model) -> list[tuple[str, str, tuple[str | None, str | None], str]]:
    """``(layer path, matmul kind, (left, right) levels, binarizer names)`` of every binary matmul of ``model``."""
    out = []
    for path, module in nnx.iter_modules(model):
        name = "/".join(map(str, path))
        if isinstance(module, BinaryLinear) and module.weight_binarizer is not None:
            pair = (module.input_binarizer, module.weight_binarizer)
            out.append((name, "block linear", tuple(map(_levels, pair)), pair))
        elif isinstance(module, Attention) and module.prob_binarizer is not None:
            q, k, v = (m.binarizer for m in (module.q_sign, module.k_sign, module.v_sign))
            out.append((name, "attention scores", (_levels(q), _levels(k)), (q, k)))
            p = module.prob_binarizer
            out.append((name, "attention values", (_levels(p), _levels(v)), (p, v)))
    return out


# Model switches whose float layers the packed forward does not compute (it would ignore their parameters):
# refused by check_packable until a preset adopts one and the forward follows it.
UNPACKED_SWITCHES = ("rprelu_everywhere", "attention_bypass")


@functools.lru_cache(maxsize=64)
def check_packable(cfg: ViTConfig, opts: BinaryOptions) -> None:
    """Raise ``ValueError`` unless :func:`packed_forward` computes every binary matmul of the model exactly.

    Dispatches on the binarizers the layers hold (their
    :class:`bvit_jax.nn.binarize.Packing`), not on option names: each binary
    matmul's ``(left, right)`` levels must be one the packed forward has an
    integer kernel for (:data:`PACKED_MATMULS`): a block linear needs +-1 on
    both sides (XNOR-popcount), so binary weights with float inputs are
    refused, and so is a binarizer with a forward the packed kernels do not
    compute (``{0, 1}`` inputs, ternary), with the layer named. Cached per
    ``(cfg, opts)``: the check walks the abstract model once. The switches
    of :data:`UNPACKED_SWITCHES` (float layers this forward does not have) are
    refused by name.
    """
    unpacked = [name for name in UNPACKED_SWITCHES if getattr(opts, name)]
    if unpacked:
        raise ValueError(
            f"the packed forward does not compute {', '.join('model.' + n for n in unpacked)} (switches tried on "
            "validation, not adopted by a preset: docs/method.md, 'Le & Li's switches'); "
            "export a model trained without them"
        )
    matmuls = _binary_matmuls(abstract_model(cfg, opts))
    if not matmuls:
        raise ValueError(
            "only models whose block linears binarize both weights and activations can be packed "
            f"(XNOR-popcount needs +-1 on both sides); got binarize_weights={opts.binarize_weights}, "
            f"binarize_acts={opts.binarize_acts} (preset 'fp' has no binary layers)"
        )
    for path, kind, levels, binarizers in matmuls:
        if levels not in PACKED_MATMULS[kind]:
            names = [type(b).__name__ if b is not None else "float" for b in binarizers]
            raise ValueError(
                f"cannot pack the {kind} of {path}: its operands ({names[0]} x {names[1]}) have levels {levels}, "
                f"and the packed forward computes {sorted(PACKED_MATMULS[kind])} there "
                "(XNOR-popcount needs +-1 on both sides: set binarize_weights and binarize_acts; a binarizer with "
                "another forward needs its packed matmul in bvit_jax/deploy/packed.py)"
            )


def _layer_norm(x, t, prefix, eps=1e-6):
    """The model's LayerNorm (:func:`bvit_jax.nn.fused_ops.layer_norm`, the same function)."""
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

    ``m`` is :func:`bvit_jax.nn.activations.asm_statistic` of ``mode`` (the model's
    ``asm_mode``; ``heads``: the attention heads the channels belong to, 1 at
    the block linears). ``shared``: all G read the same ``x`` ``(B, N, C)``
    (the statistic is computed once); else ``x`` is ``(G, B, N, C)``, one
    input per activation. Returns ``(G, B, N, C)``, or ``x`` unchanged
    (``(B, N, C)``) when there is no shift. Same operations, in the same
    order, as :class:`bvit_jax.nn.activations.ActivationShift`.
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


def _record(sink, names, shifted):
    """With a ``sink`` dict: ``sink[name] = shifted >= 0`` (the sign bits) for each of the G names.

    ``shifted`` is ``(G, ...)``, one input per name, or a single input shared by all.
    """
    if sink is None:
        return
    for i, name in enumerate(names):
        sink[name] = (shifted[i] if shifted.ndim == 4 else shifted) >= 0


def _linear_blocks(x, t, prefixes, opts, live=None, sink=None, native=None):
    """G packed :class:`bvit_jax.nn.linear.LinearBlock` s on one input ``x`` ``(B, N, K)`` -> ``(G, B, N, out)``.

    Each: ``match(x) + LN((K - 2*popcount(xor(x_bits, W_bits))) * alpha + b)``
    with ``x_bits = [x - shift(x) >= 0]``; with a folded branch normalisation
    (``branch_norm`` not ``'layernorm'``) ``match(x) + (K - 2*popcount(...)) * alpha' + b'``,
    ``alpha'``, ``b'`` the stored folded scale and bias. q, k and v run as one grouped kernel.
    ``native``: None (XLA), or the ISA of :mod:`bvit_jax.deploy.native`, whose one
    call signs, packs, multiplies and applies ``float(acc) * alpha + b`` with the
    rounding XLA applies here and in the model (two roundings when folded, else
    one fused multiply-add).
    """
    lins = [p + "/linear" for p in prefixes]
    g, (b, n_tok, k) = len(prefixes), x.shape
    shifted = _shifted(x, t, [p + "/act" for p in lins], shared=True, mode=opts.asm_mode)
    _record(sink, [p + "/act" for p in lins], shifted)
    kernels = jnp.stack([t[p + "/kernel_bits"] for p in lins])
    alpha, bias = _stacked(t, lins, "/alpha"), _stacked(t, lins, "/bias")
    folded = opts.linear_shortcut and opts.branch_norm != "layernorm"
    if native is not None:
        acts = shifted if shifted.ndim == 4 else shifted[None]  # (1 or G, B, N, K): no shift, one packing
        # folded: product rounded before the add (as ``rounded`` below); else one fused multiply-add,
        # the contraction XLA applies to ``prod + bias`` here and in the model
        mode = "muladd" if folded else "fma"
        y = native_ops.sign_matmul(
            acts.reshape(acts.shape[0], b * n_tok, k), kernels, alpha, bias, mode=mode, isa=native
        )
        return _linear_tail(x, y.reshape(g, b, n_tok, -1), t, prefixes, opts)
    bits = pack_planes(shifted)
    if bits.ndim == 3:  # no shift: one packing serves every layer
        bits = jnp.broadcast_to(bits[None], (g,) + bits.shape)

    def epilogue(acc, al, bi):
        prod = acc.astype(jnp.float32) * al[:, None, :]
        # folded branch normalisation: the product rounded before the add, as the model computes it
        return (rounded(prod) if folded else prod) + bi[:, None, :]

    y = packed_matmul(
        bits.reshape(g, b * n_tok, -1), kernels, k, live=live, epilogue=epilogue, epilogue_args=(alpha, bias)
    ).reshape(g, b, n_tok, -1)
    return _linear_tail(x, y, t, prefixes, opts)


def _linear_tail(x, y, t, prefixes, opts):
    """The shortcut and branch LayerNorm after the G binary linears ``y`` ``(G, B, N, out)``."""
    if not opts.linear_shortcut:
        return y
    if opts.branch_norm != "layernorm":  # folded into alpha and bias at export: no normalisation here
        return match_width(x, y.shape[-1])[None] + y
    scale, nbias = _stacked(t, prefixes, "/norm/scale"), _stacked(t, prefixes, "/norm/bias")
    return match_width(x, y.shape[-1])[None] + layer_norm(y, scale[:, None, None, :], nbias[:, None, None, :])


def packed_linear_block(x, t, prefix, opts, live=None, sink=None, native=None):
    """One packed :class:`bvit_jax.nn.linear.LinearBlock` on ``x`` ``(B, N, K)``: the layer of a ``.bvit`` file.

    ``t`` maps tensor names to arrays as a :class:`PackedModel` holds them
    (``prefix + "/linear/kernel_bits"`` in plane order, ``.../alpha``,
    ``.../bias``, the activation shift under ``.../act/``, and with
    ``opts.linear_shortcut`` the LayerNorm ``prefix + "/norm/..."``).
    Returns ``match(x) + LN((K - 2*popcount(xor(x_bits, W_bits))) * alpha + b)``
    (without the shortcut and LN when ``opts.linear_shortcut`` is off). With
    ``opts.branch_norm='affine'`` or ``'batchnorm'`` the file stores
    ``alpha' = alpha * s`` and ``b' = b * s + t`` (``y * s + t``: the
    normalisation at inference, :func:`bvit_jax.nn.folding.branch_norm_affine`)
    in ``.../alpha`` and ``.../bias`` (:func:`bvit_jax.nn.folding.fold_branch_affine`)
    and no ``norm``; the layer is
    ``match(x) + (K - 2*popcount(...)) * alpha' + b'``, no normalisation at run time.
    ``live``: None, or a runtime ``True`` that runs the popcount matmul as its
    own XLA computation (as in :func:`bvit_jax.deploy.bitops.packed_matmul`); ``sink``: None, or a
    dict that receives the sign bits under ``prefix + "/linear/act"`` (what
    :func:`packed_forward` returns with ``capture=True``); ``native``: None (XLA
    ops), or an ISA name of :mod:`bvit_jax.deploy.native` (its fused kernel).
    """
    return _linear_blocks(x, t, [prefix], opts, live, sink, native)[0]


def _attention(x, t, prefix, cfg, opts, attention, live=None, sink=None, native=None):
    h = cfg.num_heads
    names = [f"{prefix}/{n}" for n in ("q", "k", "v")]
    qkv = _linear_blocks(x, t, names, opts, live, sink, native)  # (3, B, N, D)
    if not opts.binary_attention:
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=h) for a in qkv)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        return packed_linear_block(
            rearrange(out, "b h n d -> b n (h d)"), t, prefix + "/proj", opts, live, sink, native
        )

    s = _shifted(qkv, t, [n + "_sign" for n in names], shared=False, mode=opts.asm_mode, heads=h)  # (3, B, N, D)
    _record(sink, [n + "_sign" for n in names], s)
    d = qkv.shape[-1] // h
    c = positive_level(t[prefix + "/attn_level_raw"])  # c = LEVEL_MIN + softplus(raw), as Attention.level()
    scale = jnp.sqrt(d).astype(jnp.float32)
    bsz, n_tok = x.shape[0], x.shape[1]
    if attention == "popcount" and native is not None:
        # scores: (d - 2*popcount(xor(q, k))) / sqrt(d), one (N, W) x (W, N) matmul per (batch, head)
        qk = pack_planes(rearrange(s[:2], "g b n (h d) -> g (b h) n d", h=h))
        scores = native_ops.matmul_scaled(qk[0], jnp.swapaxes(qk[1], 1, 2), scale, 0.0, d, mode="div", isa=native)
        scores = scores.reshape(bsz, h, n_tok, n_tok)
    elif attention == "popcount":
        qk = pack_planes(rearrange(s[:2], "g b n (h d) -> g b h n d", h=h))
        scores = packed_sign_dot(
            qk[0], qk[1], d, live=live, epilogue=lambda acc, sc: acc.astype(jnp.float32) / sc, epilogue_args=(scale,)
        )
    else:  # float +-1 matmul, as in the model
        qf, kf = (sign(rearrange(a, "b n (h d) -> b h n d", h=h)) for a in s[:2])
        scores = jnp.einsum("bhqd,bhkd->bhqk", qf, kf) / scale
    probs = jax.nn.softmax(scores, axis=-1)
    level = jnp.clip(jnp.round(probs / c), 0, 1)  # elastic_binarize(probs, c) / c, in {0, 1}
    if attention == "popcount" and native is not None:
        # 2*popcount(m & v) - popcount(m): masks (queries, key words) x values (key words, d). The
        # multiply by c stays in XLA: XLA fuses it into its consumers (and may contract it with the
        # shortcut add there, as in the model), so the native kernel returns the exact integers.
        mask = pack_bits_planes(rearrange(level > 0, "b h q k -> (b h) q k"))
        vb = pack_planes(rearrange(s[2], "b n (h d) -> (b h) d n", h=h))
        out = c * native_ops.matmul(mask, jnp.swapaxes(vb, 1, 2), n_tok, op="and", isa=native).astype(jnp.float32)
        out = out.reshape(bsz, h, n_tok, d)
    elif attention == "popcount":
        mask = pack_bits_planes(level > 0)  # (b, h, q, ceil(N/32)), along keys
        vb = pack_planes(rearrange(s[2], "b n (h d) -> b h d n", h=h))  # along keys
        out = c * masked_sign_sum(mask, vb, live=live).astype(jnp.float32)
    else:
        vf = sign(rearrange(s[2], "b n (h d) -> b h n d", h=h))
        out = jnp.einsum("bhqk,bhkd->bhqd", level, vf) * c
    return packed_linear_block(rearrange(out, "b h n d -> b n (h d)"), t, prefix + "/proj", opts, live, sink, native)


def _mlp(x, t, prefix, opts, live=None, sink=None, native=None):
    hdn = packed_linear_block(x, t, prefix + "/fc1", opts, live, sink, native)
    if opts.rprelu:
        hdn = rprelu(hdn, t[prefix + "/act/gamma"], t[prefix + "/act/zeta"], t[prefix + "/act/slope"])
    else:
        hdn = jax.nn.gelu(hdn, approximate=False)
    return packed_linear_block(hdn, t, prefix + "/fc2", opts, live, sink, native)


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "attention", "capture", "native"))
def _forward(
    tensors, images, live, *, cfg: ViTConfig, opts: BinaryOptions, attention: str, capture: bool = False, native=None
):
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
        x = x + _attention(_layer_norm(x, t, b + "/norm1"), t, b + "/attn", cfg, opts, attention, live, sink, native)
        x = x + _mlp(_layer_norm(x, t, b + "/norm2"), t, b + "/mlp", opts, live, sink, native)
    feat = _layer_norm(x[:, 0], t, "norm")
    logits = jnp.dot(feat, t["head/kernel"]) + t["head/bias"]
    return (logits, sink) if capture else logits


BACKENDS = ("auto", "native", "xla")


def resolve_backend(backend: str = "auto") -> str | None:
    """The native ISA :func:`packed_forward` runs with (``"avx512"``, ``"avx2"``, ``"portable"``), or None for XLA.

    ``"xla"``: None. ``"native"``: the library's ISA
    (:func:`bvit_jax.deploy.native.resolve_isa`: ``$BVIT_NATIVE_ISA`` or the
    best the CPU has); RuntimeError when the library is unavailable or JAX's
    default backend is not the CPU. ``"auto"``: the faster path as measured,
    today the XLA ops (None): end to end the native kernels lose to XLA's
    fused elementwise work between the matmuls (``benchmarks/packed_inference.py``,
    docs/export.md "Native runtime": DeiT-S batch 1 77 ms native against 70 ms
    XLA), so they are opt-in (``"native"``) until the work between them is
    fused as well.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("xla", "auto"):
        return None
    on_cpu = jax.default_backend() == "cpu"
    if not on_cpu:
        raise RuntimeError(f"backend='native' runs on the CPU only; JAX's default backend is {jax.default_backend()!r}")
    if not native_ops.available():
        raise RuntimeError(f"backend='native': the native library is unavailable ({native_ops.load_error()})")
    return native_ops.resolve_isa()


def packed_forward(
    packed: PackedModel, images, *, attention: str = "popcount", capture: bool = False, backend: str = "auto"
):
    """Logits of a packed model, ``(B, num_classes)`` float32, under ``jax.jit``.

    Args:
      packed: a :class:`PackedModel` (:func:`bvit_jax.deploy.export.load_packed` or
        :func:`bvit_jax.deploy.export.pack_model`).
      images: ``(B, image_size, image_size, in_channels)``, preprocessed as for
        the model (normalised floats).
      attention: binary attention matmuls by ``"popcount"`` (default) or by a
        float matmul of the +-1 / {0, c} operands (``"float"``, for comparison).
      capture: also return the sign bits: ``(logits, {path: bits})`` with
        ``bits = x - shift(x) >= 0`` (bool, the input's shape) for every sign,
        keyed like ``model(images, capture=True)`` (e.g.
        ``"blocks/0/attn/q/linear/act"``, ``"blocks/0/attn/q_sign"``).
      backend: ``"auto"`` (default: the faster path as measured, today XLA
        ops), ``"native"`` (the kernels of :mod:`bvit_jax.deploy.native`) or
        ``"xla"`` (:func:`resolve_backend`). Native: each binary linear is one
        call (sign, pack, popcount matmul, ``float(acc) * alpha + b`` rounded as XLA does) and the
        attention matmuls are too; everything else is the same XLA code. Both
        give the same logits bit for bit (``docs/export.md``, "Native runtime").

    Equals ``model(images)`` of the float32 training-time model: the model
    computes its binary matmuls as exact integers scaled afterwards
    (:func:`bvit_jax.nn.binarize.binary_matmul`,
    :func:`bvit_jax.nn.binarize.elastic_matmul`) and its LayerNorms with the same
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
    check_packable(cfg, packed.opts)
    native = resolve_backend(backend)
    # ``live``: a runtime True that lets the popcount kernels run as separate XLA
    # computations (the ``live`` argument of bvit_jax.deploy.bitops.packed_matmul).
    return _forward(
        dict(packed.tensors),
        images,
        None if native else np.bool_(True),
        cfg=cfg,
        opts=packed.opts,
        attention=attention,
        capture=capture,
        native=native,
    )
