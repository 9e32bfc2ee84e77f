"""Gradient accumulation: one optimizer update from ``k`` micro-batches.

A global batch of ``B`` examples is split into ``k`` micro-batches of
``B / k``; the loss and gradient are computed one micro-batch at a time (so
activations of only ``B / k`` examples are alive at once) and averaged:

    L = 1/k * sum_i L_i,     grad L = 1/k * sum_i grad L_i

With equal micro-batches and a per-example mean loss this is the loss and
gradient of the whole batch (up to float rounding: the batch sum is
reassociated). The optimizer then runs once, so every schedule counts
optimizer updates and ``global_batch_size`` is the batch of one update
(the convention of big_vision's ``accum_steps`` and of DeiT's linear scaling).

Micro-batch ``i`` takes the rows ``i, i + k, i + 2k, ...``: a batch sharded
along its first axis splits into micro-batches that are sharded the same way,
so no device sends examples to another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["split_micro_batches", "accumulated_value_and_grad"]


def split_micro_batches(batch: Any, k: int) -> Any:
    """Every leaf ``(B, ...) -> (k, B / k, ...)``; micro-batch ``i`` holds rows ``i::k``."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {k} equal micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulated_value_and_grad(fun: Callable[..., tuple[jax.Array, Any]], k: int) -> Callable[..., Any]:
    """``jax.value_and_grad(fun, has_aux=True)`` averaged over ``k`` micro-batches.

    ``fun(params, batch, *args) -> (loss, aux)`` with ``aux`` a pytree of
    scalars (per-batch means). Returns a function with the same signature and
    result ``((mean loss, mean aux), mean grads)``. ``k = 1`` is exactly
    ``jax.value_and_grad``; ``k > 1`` runs the micro-batches in a
    ``lax.scan`` and sums in float32.
    """
    value_and_grad = jax.value_and_grad(fun, has_aux=True)
    if k == 1:
        return value_and_grad

    def accumulated(params, batch, *args):
        def body(carry, micro):
            (loss, aux), grads = value_and_grad(params, micro, *args)
            out = (loss, aux, grads)
            return jax.tree.map(lambda c, x: c + x.astype(jnp.float32), carry, out), None

        shapes = jax.eval_shape(
            value_and_grad, params, jax.tree.map(lambda x: x[0], split_micro_batches(batch, k)), *args
        )
        (loss_shape, aux_shape), grad_shape = shapes
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss_shape, aux_shape, grad_shape))
        (loss, aux, grads), _ = jax.lax.scan(body, zeros, split_micro_batches(batch, k))
        mean = lambda tree, like: jax.tree.map(lambda x, s: (x / k).astype(s.dtype), tree, like)
        return (mean(loss, loss_shape), mean(aux, aux_shape)), mean(grads, grad_shape)

    return accumulated
