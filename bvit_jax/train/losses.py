"""Training losses: soft-label cross-entropy and knowledge distillation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["cross_entropy", "distillation_kl", "topk_correct"]


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """Mean over the batch of ``-sum_k y_k log softmax(z)_k`` (targets may be smoothed/mixed)."""
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), soft_labels))


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``T^2 * mean_batch KL(p_t || p_s)`` with ``p = softmax(z / T)``.

    ``KL(p_t || p_s) = sum_k p_t,k (log p_t,k - log p_s,k)``; zero iff the
    distributions agree; the gradient w.r.t. the student logits is
    ``T * (p_s - p_t)`` per example. The teacher is not differentiated.
    Source: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).
    """
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_pt = jax.nn.log_softmax(t)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - jax.nn.log_softmax(s)), axis=-1)
    return temperature**2 * jnp.mean(kl)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per example: 1.0 if the true label is among the ``k`` largest logits, else 0.0."""
    k = min(k, logits.shape[-1])
    _, idx = jax.lax.top_k(logits, k)
    return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)
