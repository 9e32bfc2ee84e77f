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

A model with batch statistics (BatchNorm running averages) passes them
through the micro-batches in order (``has_state=True``): micro-batch ``i``
is normalised with its own statistics and updates the running averages
that micro-batch ``i + 1`` starts from, as ``k`` small steps would.
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


def accumulated_value_and_grad(
    fun: Callable[..., tuple[jax.Array, Any]], k: int, *, has_state: bool = False
) -> Callable[..., Any]:
    """``jax.value_and_grad(fun, has_aux=True)`` averaged over ``k`` micro-batches.

    ``fun(params, batch, *args) -> (loss, aux)`` with ``aux`` a pytree of
    scalars (per-batch means). Returns a function with the same signature and
    result ``((mean loss, mean aux), mean grads)``. ``k = 1`` is exactly
    ``jax.value_and_grad``; ``k > 1`` runs the micro-batches in a
    ``lax.scan`` and sums in float32.

    ``has_state=True``: ``fun(params, state, batch, *args) -> (loss, (aux,
    new_state))`` (no gradient with respect to ``state``); the result is
    ``((mean loss, mean aux), mean grads, state after the last micro-batch)``,
    each micro-batch starting from the state the previous one left.
    """
    if not has_state:

        def with_empty_state(params, state, *args):
            loss, aux = fun(params, *args)
            return loss, (aux, state)

        stateful = accumulated_value_and_grad(with_empty_state, k, has_state=True)
        return lambda params, batch, *args: stateful(params, (), batch, *args)[:2]
    value_and_grad = jax.value_and_grad(fun, has_aux=True)

    def one(params, state, batch, *args):
        (loss, (aux, state)), grads = value_and_grad(params, state, batch, *args)
        return (loss, aux), grads, state

    if k == 1:
        return one

    def accumulated(params, state, batch, *args):
        def body(carry, micro):
            sums, state = carry
            (loss, aux), grads, state = one(params, state, micro, *args)
            sums = jax.tree.map(lambda c, x: c + x.astype(jnp.float32), sums, (loss, aux, grads))
            return (sums, state), None

        micro_batches = split_micro_batches(batch, k)
        (loss_shape, aux_shape), grad_shape, _ = jax.eval_shape(
            one, params, state, jax.tree.map(lambda x: x[0], micro_batches), *args
        )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss_shape, aux_shape, grad_shape))
        ((loss, aux, grads), state), _ = jax.lax.scan(body, (zeros, state), micro_batches)
        mean = lambda tree, like: jax.tree.map(lambda x, s: (x / k).astype(s.dtype), tree, like)
        return (mean(loss, loss_shape), mean(aux, aux_shape)), mean(grads, grad_shape), state

    return accumulated
