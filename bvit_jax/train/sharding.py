"""Device mesh, partition rules and global batches (``jax.jit`` + ``NamedSharding``).

The mesh has two axes: ``data`` (pure data parallelism: parameters replicated)
and ``fsdp`` (fully-sharded data parallelism: the batch *and* the largest
divisible dimension of every big array are split across it, ZeRO-3 style).
Batches are split over both axes. Axes are ``AxisType.Auto``: we pin the
shardings of the step's inputs and outputs and let XLA's propagation place
everything in between, which keeps the model code free of sharding
annotations (Explicit axes would require typing every intermediate).

On a multislice TPU job (devices with several ``slice_index`` values: chips of
one slice talk over the fast inter-chip interconnect, ICI; slices over the
data-centre network, DCN) the mesh is a hybrid one: ``fsdp``, whose
all-gathers and reduce-scatters run every layer, lies within a slice, and only
``data``, whose gradient all-reduce runs once a step, crosses slices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "create_mesh",
    "hybrid_mesh",
    "slice_groups",
    "batch_sharding",
    "replicated",
    "fsdp_spec",
    "tree_shardings",
    "global_batch",
]

BATCH_AXES = ("data", "fsdp")


def create_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``(data, fsdp)`` mesh over all devices; ``-1`` means "the rest".

    On a single host a smaller explicit mesh uses the first ``data * fsdp``
    devices (handy for comparisons); across hosts the mesh must cover all.
    Devices of one slice (one ``slice_index``, or none): ``jax.make_mesh``'s
    topology-aware order. Devices of ``S > 1`` slices: a hybrid mesh
    (:func:`hybrid_mesh`), ``data = S x (data / S)`` with the ``S`` factor
    over the slices and every ``fsdp`` group inside one slice.

    Raises a ``ValueError`` that says what to change when the sizes do not
    multiply to the device count, or (several slices) when ``fsdp`` does not
    fit within a slice.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp < 1 or (data != -1 and data < 1):
        raise ValueError(f"mesh sizes must be positive (or data=-1), got data={data}, fsdp={fsdp}")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices; pick a divisor of {n}")
        data = n // fsdp
    if len(slice_groups(devices)) > 1:
        return hybrid_mesh(data, fsdp, devices)
    if data * fsdp < n and jax.process_count() == 1:
        devices = devices[: data * fsdp]  # a sub-mesh of this host's devices
    elif data * fsdp != n:
        raise ValueError(
            f"config.mesh.data * config.mesh.fsdp = {data}*{fsdp} != {n} devices; "
            "set config.mesh.data=-1 to use all remaining devices"
        )
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def slice_groups(devices) -> list[list]:
    """The devices grouped by ``slice_index`` (ascending; devices without one count as slice 0)."""
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(getattr(d, "slice_index", 0), []).append(d)
    return [groups[k] for k in sorted(groups)]


def hybrid_mesh(data: int, fsdp: int, devices) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``S`` slices: ``data`` split as ``S`` (DCN) x ``data / S`` (ICI), ``fsdp`` ICI.

    Built by ``jax.experimental.mesh_utils.create_hybrid_device_mesh`` with
    the within-slice shape ``(data / S, fsdp)`` and the across-slice shape
    ``(S, 1)``: row ``i`` of the mesh (one ``data`` index) lies in slice
    ``i // (data / S)``, so each ``fsdp`` group (a row) is inside one slice
    and each ``data`` group (a column) takes ``data / S`` devices from every
    slice. The JAX "multislice" recipe (``docs.jax.dev``, "Distributed
    arrays and automatic parallelization"; MaxText's DCN/ICI mesh split).

    Raises ``ValueError`` when ``data * fsdp`` is not the device count (a
    multislice mesh covers every device), when the slices differ in size, or
    when ``fsdp`` does not divide a slice's device count (an ``fsdp`` group
    would cross the DCN; with ``data * fsdp = S * per_slice`` this is also
    the only way ``data`` can fail to divide over the ``S`` slices).
    """
    groups = slice_groups(devices)
    num_slices, per_slice = len(groups), len(groups[0])
    if data * fsdp != len(devices):
        raise ValueError(
            f"config.mesh.data * config.mesh.fsdp = {data}*{fsdp} != {len(devices)} devices of {num_slices} slices: "
            "a multislice mesh covers every device; set config.mesh.data=-1"
        )
    if any(len(g) != per_slice for g in groups):
        sizes = sorted({len(g) for g in groups})
        raise ValueError(
            f"the {num_slices} slices hold different numbers of devices ({sizes}); a mesh needs equal ones"
        )
    if per_slice % fsdp:
        raise ValueError(
            f"config.mesh.fsdp={fsdp} does not fit within one slice of {per_slice} devices ({num_slices} slices): "
            "FSDP communicates every layer and must stay on the slice's interconnect "
            f"(and data={data} must divide over the slices); "
            f"use a divisor of {per_slice}"
        )
    kind = devices[0].device_kind
    array = mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, fsdp),
        (num_slices, 1),
        devices,
        allow_split_physical_axes=kind in ("TPU v5 lite", "TPU v5e"),  # as jax.make_mesh does
    )
    return Mesh(array, ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


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
