"""Diagnostics of binary training: weight oscillation and activation information.

Pure functions, cheap enough to run under ``jax.jit`` every N steps. Every
function returns a flat dict of scalars keyed ``"<metric>/<layer path>"``
plus ``"<metric>/mean"`` (the unweighted mean over layers) and, for shares of
weights, ``"<metric>/all"`` (the share over all latent weights pooled), ready
for a JSON-lines logger (``{k: float(v) for k, v in metrics.items()}``).

Weights are read from parameter pure dicts (``nnx.to_pure_dict(nnx.state(model,
nnx.Param))``) through the latent-weight mask of
:func:`bvit_jax.nn.param_groups.latent_weight_mask`. The mask selects leaves by
Python bools, so it must be static under ``jit``: close over it, e.g.
``jax.jit(lambda p0, p1: flip_rate(p0, p1, mask))``. ``alpha = mean(|W|)`` is
taken per output channel (over every axis but the last), as in the weight
binarizer, and ``sign(0) = +1`` throughout.

Weight metrics
  * **flip rate** (larq's ``flip_ratio``): share of latent weights whose
    ``sign(W)`` differs between two parameter sets.
  * **oscillation frequency** (Nagel et al., "Overcoming Oscillations in
    Quantization-Aware Training", ICML 2022, Sec. 3): per weight, an
    oscillation at a check is a sign flip whose direction is opposite to the
    previous flip's direction; the frequency is the EMA
    ``f <- (1 - m) f + m * osc`` with momentum ``m = 0.01``. With two levels
    every flip after a weight's first one reverses the previous one. When the
    update runs every N steps, ``f`` is a frequency per check, not per step.
  * **never flipped**: share of latent weights whose sign has not changed
    since the step the count starts from (the end of the learning-rate
    warm-up in the trainer): weights the training has not moved across 0.
  * **silent weights** (OvSW, Xiang et al., ECCV 2024; ReCU, Xu et al., ICCV
    2021): share of latent weights whose flip EMA ``e <- (1 - m) e + m *
    flipped`` (``m = 0.001``, OvSW's momentum 0.999 of the past) is below
    ``1e-4``: weights that have stopped flipping. Cutting flips is not by
    itself a benefit; a large silent share says the signs are stuck.
  * **outside the STE window**: share of latent weights with ``|W| > 1``,
    where the clipped straight-through gradient ``alpha * dL/dW_b * 1{|W| <= 1}``
    of the weight binarizer (:mod:`bvit_jax.nn.binarize`) is zero: such a weight
    gets no gradient again and keeps its sign for good (only GRS or the
    optional clip ``optimizer.latent_weight_clip`` bring it back).
  * **near zero**: share of latent weights with ``|W| < frac * alpha``
    (``frac = 1/4`` by default): the weights at the sign boundary.
  * **bimodality**: Sarle's bimodality coefficient of ``u = W / alpha`` pooled
    over a layer, ``b = (g^2 + 1) / k`` with ``g = m3 / m2^{3/2}`` the skewness
    and ``k = m4 / m2^2`` the (non-excess) kurtosis, population moments (the
    large-sample form; SAS/STAT manual, PROC CLUSTER; Pfister et al., "Good
    things peak in pairs", Front. Psychol. 2013). ``b`` is 1/3 for a Gaussian,
    5/9 for a uniform, and tends to 1 for two point masses (``u = +-1``): above
    5/9 suggests bimodality. Dividing by ``alpha`` puts the modes of all
    output channels at ``+-1`` before pooling.

Activation metrics, from the intermediates that ``model(x, capture=True)``
returns (``{sign_path: {"x": input, "shifted": input - shift}}``), reduced over
every axis but the last (batch and tokens) per channel:
  * **entropy** (bits, at most 1): ``p_c`` = share of ``shifted >= 0`` in
    channel ``c``, ``H_c = -p_c log2 p_c - (1 - p_c) log2 (1 - p_c)``
    (``0 log 0 = 0``), averaged over channels. 1 bit means each binarized
    channel is +1 half the time (the most information a sign can carry).
  * **token entropy** (bits, at most 1): the same per token instead of per
    channel: ``q_t`` = share of token ``t``'s channels with ``shifted >= 0``,
    ``H(q_t)`` averaged over tokens and images. The channel entropy cannot see
    an offset that differs from token to token (each token's bits nearly
    constant, but positive for some tokens and negative for others, so every
    channel is still +1 about half the time); this one does. ASM's
    ``'token_mean'`` form targets the channel entropy, its ``'per_token'`` /
    ``'per_head'`` forms the token entropy (``docs/method.md``, "ASM").
  * **share of +1**: share of ``shifted >= 0`` over all elements.
  * **relative error**: ``||x - alpha * sign(x - shift)|| / ||x||`` with
    ``alpha_c = mean|x - shift|`` per channel (the L1-optimal scale of a sign
    approximation, XNOR-Net) and Frobenius norms over the whole tensor: how
    well the scaled binary activation approximates the real input the layer
    would otherwise see (a large channel offset that the sign discards shows up
    here).
  * **binarizer error**: ``||s - alpha * sign(s)|| / ||s||`` with
    ``s = x - shift``: the error of the sign on its own (shifted) input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bvit_jax.nn.binarize import WeightBinarizer, channel_alpha, sign
from bvit_jax.nn.param_groups import flatten_with_paths

__all__ = [
    "latent_weights",
    "flip_rate",
    "OscillationState",
    "oscillation_init",
    "oscillation_update",
    "SILENT_MOMENTUM",
    "SILENT_THRESHOLD",
    "near_zero_share",
    "STE_WINDOW",
    "outside_ste_window_share",
    "bimodality_coefficient",
    "bimodality",
    "weight_metrics",
    "binary_entropy",
    "activation_metrics",
]

_EPS = 1e-12
# The default kernel binarizer's straight-through gradient is alpha * dL/dW_b * 1{|W| <= STE_WINDOW}
# (bvit_jax.nn.binarize.WeightBinarizer; another kernel binarizer states its own ste_window).
STE_WINDOW = WeightBinarizer.ste_window


def _sign_int8(x: jax.Array) -> jax.Array:
    """:func:`bvit_jax.nn.binarize.sign` stored as ``int8`` (the oscillation state keeps one per weight)."""
    return sign(x).astype(jnp.int8)


def latent_weights(params: Any, mask: Any) -> dict[str, jax.Array]:
    """``{path: W}`` for the leaves of ``params`` where ``mask`` is True.

    ``mask`` has the structure of ``params`` with concrete bools (it must not be
    a traced argument of a jitted function: close over it).
    """
    flat_p = flatten_with_paths(params)
    flat_m = flatten_with_paths(mask)
    if [p for p, _ in flat_p] != [p for p, _ in flat_m]:
        raise ValueError("mask must have the same structure as params (see param_groups.latent_weight_mask)")
    out = {}
    for (path, w), (_, m) in zip(flat_p, flat_m):
        if isinstance(m, jax.core.Tracer):
            raise TypeError("the latent-weight mask must be static under jit: close over it instead of passing it")
        if bool(np.asarray(m)):
            out[path] = w
    if not out:
        raise ValueError("the mask selects no latent weights (is the model binary?)")
    return out


def _summarize(
    name: str, per_layer: Mapping[str, jax.Array], counts: Mapping[str, int] | None = None
) -> dict[str, jax.Array]:
    out = {f"{name}/{k}": v for k, v in per_layer.items()}
    vals = list(per_layer.values())
    out[f"{name}/mean"] = jnp.mean(jnp.stack(vals))
    if counts is not None:
        total = sum(counts.values())
        out[f"{name}/all"] = sum(per_layer[k] * counts[k] for k in per_layer) / total
    return out


def flip_rate(prev_params: Any, params: Any, mask: Any) -> dict[str, jax.Array]:
    """Share of latent weights whose ``sign(W)`` (``sign(0) = +1``) changed, per layer.

    Keys ``flip_rate/<path>``, ``flip_rate/mean`` and ``flip_rate/all``.
    """
    w0, w1 = latent_weights(prev_params, mask), latent_weights(params, mask)
    per = {k: jnp.mean((sign(w0[k]) != sign(w1[k])).astype(jnp.float32)) for k in w1}
    return _summarize("flip_rate", per, {k: w1[k].size for k in w1})


# Silent weights: flip EMA with new-value weight SILENT_MOMENTUM below SILENT_THRESHOLD (OvSW's 0.999 / 1e-4).
SILENT_MOMENTUM = 0.001
SILENT_THRESHOLD = 1e-4


class OscillationState(NamedTuple):
    """Per latent weight: its last sign, the direction of its last flip
    (+1: to +1, -1: to -1, 0: none yet), its EMA oscillation frequency, its
    EMA flip frequency (for the silent share) and whether it has flipped
    since the count started (for the never-flipped share)."""

    last_sign: dict[str, jax.Array]
    last_flip: dict[str, jax.Array]
    freq: dict[str, jax.Array]
    flip_ema: dict[str, jax.Array]
    flipped_since: dict[str, jax.Array]


def oscillation_init(params: Any, mask: Any) -> OscillationState:
    """The state before any check: signs of ``params``, no flips, frequency 0."""
    w = latent_weights(params, mask)
    return OscillationState(
        last_sign={k: _sign_int8(v) for k, v in w.items()},
        last_flip={k: jnp.zeros(v.shape, jnp.int8) for k, v in w.items()},
        freq={k: jnp.zeros(v.shape, jnp.float32) for k, v in w.items()},
        flip_ema={k: jnp.zeros(v.shape, jnp.float32) for k, v in w.items()},
        flipped_since={k: jnp.zeros(v.shape, jnp.bool_) for k, v in w.items()},
    )


def oscillation_update(
    state: OscillationState,
    params: Any,
    mask: Any,
    momentum: float = 0.01,
    threshold: float = 0.005,
    count_flips: jax.Array | bool = True,
) -> tuple[OscillationState, dict[str, jax.Array]]:
    """One check: ``osc = flipped and direction == -last_direction``; ``f <- (1-m) f + m * osc``.

    Also ``e <- (1 - m_s) e + m_s * flipped`` (``m_s`` = :data:`SILENT_MOMENTUM`)
    and ``flipped_since <- flipped_since or (flipped and count_flips)``
    (``count_flips``: whether this check is past the point the never-flipped
    count starts from, e.g. ``step >= warmup_steps``).

    Returns the new state and metrics: ``osc_freq/<path>`` (mean frequency),
    ``osc_share/<path>`` (share of weights with frequency above ``threshold``),
    ``never_flipped/<path>`` (share with ``flipped_since`` False),
    ``silent/<path>`` (share with ``e <`` :data:`SILENT_THRESHOLD`), each with
    ``/mean`` and ``/all``.
    """
    w = latent_weights(params, mask)
    new_sign, new_flip, new_freq, freq_mean, share = {}, {}, {}, {}, {}
    new_ema, new_since, never, silent = {}, {}, {}, {}
    for k, v in w.items():
        s = _sign_int8(v)
        flipped = s != state.last_sign[k]
        direction = jnp.where(flipped, s, 0).astype(jnp.int8)  # new sign = direction of the flip
        osc = flipped & (state.last_flip[k] != 0) & (direction == -state.last_flip[k])
        f = (1.0 - momentum) * state.freq[k] + momentum * osc.astype(jnp.float32)
        new_sign[k] = s
        new_flip[k] = jnp.where(flipped, direction, state.last_flip[k]).astype(jnp.int8)
        new_freq[k] = f
        freq_mean[k] = jnp.mean(f)
        share[k] = jnp.mean((f > threshold).astype(jnp.float32))
        e = (1.0 - SILENT_MOMENTUM) * state.flip_ema[k] + SILENT_MOMENTUM * flipped.astype(jnp.float32)
        new_ema[k] = e
        new_since[k] = state.flipped_since[k] | (flipped & count_flips)
        never[k] = jnp.mean((~new_since[k]).astype(jnp.float32))
        silent[k] = jnp.mean((e < SILENT_THRESHOLD).astype(jnp.float32))
    counts = {k: v.size for k, v in w.items()}
    metrics = {
        **_summarize("osc_freq", freq_mean, counts),
        **_summarize("osc_share", share, counts),
        **_summarize("never_flipped", never, counts),
        **_summarize("silent", silent, counts),
    }
    return OscillationState(new_sign, new_flip, new_freq, new_ema, new_since), metrics


def near_zero_share(params: Any, mask: Any, frac: float = 0.25) -> dict[str, jax.Array]:
    """Share of latent weights with ``|W| < frac * alpha`` (alpha per output channel), per layer."""
    w = latent_weights(params, mask)
    per = {k: jnp.mean((jnp.abs(v) < frac * channel_alpha(v)).astype(jnp.float32)) for k, v in w.items()}
    return _summarize("near_zero", per, {k: v.size for k, v in w.items()})


def outside_ste_window_share(params: Any, mask: Any, window: float = STE_WINDOW) -> dict[str, jax.Array]:
    """Share of latent weights outside the straight-through window, ``|W| > window``, per layer.

    The default kernel binarizer passes ``dL/dW = alpha * dL/dW_b * 1{|W| <= 1}``
    (the clipped STE of Hubara et al., 2016; :mod:`bvit_jax.nn.binarize`), so
    a latent weight with ``|W| > 1`` gets no gradient from the loss: its sign
    is fixed until GRS (which pulls ``|W|`` towards ``alpha``) or the latent
    weight clip (:func:`bvit_jax.train.optim.clip_latent_weights`) moves it back.
    ``window`` is the kernel binarizer's ``ste_window`` (``math.inf`` for one
    whose gradient is not clipped: the share is then 0).
    Keys ``outside_window/<path>``, ``outside_window/mean``,
    ``outside_window/all`` (pooled over all latent weights; the train step
    logs this one every step).
    """
    w = latent_weights(params, mask)
    per = {k: jnp.mean((jnp.abs(v) > window).astype(jnp.float32)) for k, v in w.items()}
    return _summarize("outside_window", per, {k: v.size for k, v in w.items()})


def bimodality_coefficient(u: jax.Array) -> jax.Array:
    """Sarle's bimodality coefficient ``(skew^2 + 1) / kurtosis`` of all elements of ``u``
    (population moments; 1/3 Gaussian, 5/9 uniform, -> 1 for two point masses)."""
    u = jnp.ravel(u).astype(jnp.float32)
    d = u - jnp.mean(u)
    m2, m3, m4 = jnp.mean(d**2), jnp.mean(d**3), jnp.mean(d**4)
    skew2 = m3**2 / jnp.maximum(m2**3, _EPS)
    kurt = m4 / jnp.maximum(m2**2, _EPS)
    return (skew2 + 1.0) / jnp.maximum(kurt, _EPS)


def bimodality(params: Any, mask: Any) -> dict[str, jax.Array]:
    """Bimodality coefficient of ``W / alpha`` (alpha per output channel), per layer."""
    w = latent_weights(params, mask)
    per = {k: bimodality_coefficient(v / jnp.maximum(channel_alpha(v), _EPS)) for k, v in w.items()}
    return _summarize("bimodality", per)


def weight_metrics(
    prev_params: Any, params: Any, mask: Any, near_zero_frac: float = 0.25, window: float = STE_WINDOW
) -> dict[str, jax.Array]:
    """Flip rate, near-zero share, share outside the STE window (``window``) and bimodality in one dict."""
    return {
        **flip_rate(prev_params, params, mask),
        **near_zero_share(params, mask, near_zero_frac),
        **outside_ste_window_share(params, mask, window),
        **bimodality(params, mask),
    }


def binary_entropy(p: jax.Array) -> jax.Array:
    """``-p log2 p - (1-p) log2 (1-p)`` in bits, with ``0 log 0 = 0``."""
    p = jnp.clip(p.astype(jnp.float32), 0.0, 1.0)

    def term(q):
        return jnp.where(q > 0, -q * jnp.log2(jnp.where(q > 0, q, 1.0)), 0.0)

    return term(p) + term(1.0 - p)


def activation_metrics(captured: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """Entropy, share of +1 and approximation errors of every captured sign input.

    ``captured`` is the second output of ``model(x, capture=True)``. Keys
    ``act_entropy/<path>``, ``act_token_entropy/<path>``,
    ``act_pos_share/<path>``, ``act_rel_error/<path>``,
    ``act_bin_error/<path>``, each with ``/mean`` over layers.
    """
    if not captured:
        raise ValueError("no captured sign inputs: is the model binary, and was it called with capture=True?")
    ent, tok_ent, pos, rel, binerr = {}, {}, {}, {}, {}
    for path, d in captured.items():
        x = d["x"].astype(jnp.float32)
        s = d["shifted"].astype(jnp.float32)
        axes = tuple(range(s.ndim - 1))
        plus = (s >= 0).astype(jnp.float32)
        p_c = jnp.mean(plus, axis=axes)
        ent[path] = jnp.mean(binary_entropy(p_c))
        tok_ent[path] = jnp.mean(binary_entropy(jnp.mean(plus, axis=-1)))
        pos[path] = jnp.mean(plus)
        approx = channel_alpha(s) * sign(s)
        rel[path] = jnp.linalg.norm(x - approx) / jnp.maximum(jnp.linalg.norm(x), _EPS)
        binerr[path] = jnp.linalg.norm(s - approx) / jnp.maximum(jnp.linalg.norm(s), _EPS)
    return {
        **_summarize("act_entropy", ent),
        **_summarize("act_token_entropy", tok_ent),
        **_summarize("act_pos_share", pos),
        **_summarize("act_rel_error", rel),
        **_summarize("act_bin_error", binerr),
    }
