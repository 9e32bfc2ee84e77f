"""Losses (:mod:`bvit_jax.train.losses`): the distillation KL, its value and its gradient.

References are computed in float64. Bounds are the first-order float32 error
of the arithmetic (``tests/tolerances.py``: ``gamma_n(n) = n u / (1 - n u)``
for ``n`` roundings in any order): a float32 ``log_softmax`` / ``softmax`` of
``k`` logits takes about ``k + 3`` roundings (max, the ``k`` terms of the sum
of exponentials, its log, the subtraction), so each value is within
``gamma_n(k + 3)`` of its exact value, relatively for ``softmax`` and
relative to ``|z - max| + log-sum-exp`` for ``log_softmax``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bvit_jax.train.losses import distillation_kl
from tests.tolerances import assert_within, gamma_n


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_loss_is_zero_for_equal_logits_and_its_gradient_points_to_the_teacher():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    b, k = s.shape
    # KL(p_t || p_t): sum_k p_k (log p_k - log p_k), both logs of the same float32 inputs, each within
    # gamma_{k+3} (|t - max| + lse) of the exact value; the weights p sum to 1 (+ k roundings).
    tn = np.asarray(t, np.float64)
    lse = np.log(np.exp(tn - tn.max(-1, keepdims=True)).sum(-1))
    scale = np.max(np.abs(tn - tn.max(-1, keepdims=True)).max(-1) + lse)
    assert abs(float(distillation_kl(t, t))) <= 2 * gamma_n(k + 3) * scale * (1 + gamma_n(k))
    assert float(distillation_kl(s, t)) > 0.01
    for temp in (1.0, 2.0):  # dividing by 1 or 2 and multiplying by T^2 are exact
        g = jax.grad(distillation_kl)(s, t, temp)
        p_s, p_t = _softmax64(np.asarray(s) / temp), _softmax64(np.asarray(t) / temp)
        expected = temp * (p_s - p_t) / b
        # autodiff of log_softmax: T/B (p_s * sum(p_t) - p_t); p_s, p_t within gamma_{k+3} relative,
        # sum(p_t) within gamma_{2k+3}, the product and the difference one rounding each
        assert_within(g, expected, temp / b * gamma_n(2 * k + 8) * (p_s + p_t), f"d KL / d s, T={temp}")
    # A small step against the gradient brings the student closer to the teacher.
    g = jax.grad(distillation_kl)(s, t)
    assert float(distillation_kl(s - 0.5 * g, t)) < float(distillation_kl(s, t))
