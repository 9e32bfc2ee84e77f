"""Device mesh, partition rules and global batches (``jax.jit`` + ``NamedSharding``).

The mesh has two axes: ``data`` (pure data parallelism: parameters replicated)
and ``fsdp`` (fully-sharded data parallelism: the batch *and* the largest
divisible dimension of every big array are split across it, ZeRO-3 style).
Batches are split over both axes. Axes are ``AxisType.Auto``: we pin the
shardings of the step's inputs and outputs and let XLA's propagation place
everything in between, which keeps the model code free of sharding
annotations (Explicit axes would require typing every intermediate).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["create_mesh", "batch_sharding", "replicated", "fsdp_spec", "tree_shardings", "global_batch"]

BATCH_AXES = ("data", "fsdp")


def create_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``(data, fsdp)`` mesh over all devices; ``-1`` means "the rest".

    On a single host a smaller explicit mesh uses the first ``data * fsdp``
    devices (handy for comparisons); across hosts the mesh must cover all.

    Raises a ``ValueError`` that says what to change when the sizes do not
    multiply to the device count.
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if fsdp < 1 or (data != -1 and data < 1):
        raise ValueError(f"mesh sizes must be positive (or data=-1), got data={data}, fsdp={fsdp}")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices; pick a divisor of {n}")
        data = n // fsdp
    if data * fsdp < n and jax.process_count() == 1:
        devices = devices[: data * fsdp]  # a sub-mesh of this host's devices
    elif data * fsdp != n:
        raise ValueError(
            f"config.mesh.data * config.mesh.fsdp = {data}*{fsdp} != {n} devices; "
            "set config.mesh.data=-1 to use all remaining devices"
        )
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14) -> P:
    """Partition spec for one array under FSDP.

    Shards the largest dimension divisible by ``fsdp_size`` along ``fsdp``;
    arrays smaller than ``min_size`` elements, or with no divisible
    dimension, stay replicated (the rule big_vision's ``fsdp`` sharding uses).
    """
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in np.argsort(shape)[::-1]:
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(mesh, tree: Any, min_size: int = 2**14) -> Any:
    """``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``).

    The rule depends on shape only, so it applies equally to parameters and to
    the optimizer state that mirrors them.
    """
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)), tree)


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assemble each process's share into global arrays split over the batch axes.

    ``jax.make_array_from_process_local_data``: every process passes its own
    rows; the global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
