"""Shared helpers of the 1-bit path's tests (bit ops, packed forward, the ``.bvit`` file, export)."""

from __future__ import annotations

import json
import struct
import zlib

import jax
import numpy as np
from flax import nnx

from bvit_jax.deploy.bvit_format import read_header


def sign(x):
    return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.float32)


def perturb(model, seed=1, scale=0.1):
    """Move every parameter off its init (shifts, gammas, LN, levels), and BatchNorm statistics, as training would.

    A fresh model has all shifts exactly 0, so the attention output ``P_b V_b``
    (often exactly 0) meets its sign with no shift, an untypical case
    (``test_packed_forward_matches_fresh_model``; docs/export.md, "Exactness").
    """
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    key, new = jax.random.key(seed), []
    for i, leaf in enumerate(leaves):
        k = jax.random.fold_in(key, i)
        if leaf.ndim == 0:  # attention level c > 0
            new.append(leaf * (1 + 0.3 * jax.random.uniform(k)))
        else:
            new.append(leaf + scale * jax.random.normal(k, leaf.shape))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    # BatchNorm running statistics (branch_norm='batchnorm'): means moved, variances scaled in [0.5, 1.5)
    stats = nnx.state(model, nnx.BatchStat)
    leaves, treedef = jax.tree.flatten_with_path(stats)
    key, new = jax.random.key(seed + 1), []
    for i, (path, leaf) in enumerate(leaves):
        k = jax.random.fold_in(key, i)
        if "['var']" in jax.tree_util.keystr(path):
            new.append(leaf * (0.5 + jax.random.uniform(k, leaf.shape)))
        else:
            new.append(leaf + scale * jax.random.normal(k, leaf.shape))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def model_forward(model, x):
    """``model(x)`` under one jit (compiles faster than op-by-op dispatch)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def random_images(cfg, b=2, seed=3):
    """Standard normal images ``(b, size, size, channels)`` for ``cfg`` (a fixed seed)."""
    return jax.random.normal(jax.random.key(seed), (b, cfg.image_size, cfg.image_size, cfg.in_channels))


def with_header(blob, edit):
    """``blob`` with its JSON header replaced by ``edit(header)`` (payload unchanged)."""
    header = read_header(blob)
    edit(header)
    hlen = struct.unpack_from("<I", blob, 8)[0]
    start = 12 + hlen + (-(12 + hlen) % 64)
    new = zlib.compress(json.dumps(header).encode())
    prefix = blob[:8] + struct.pack("<I", len(new)) + new
    return prefix + b"\0" * (-len(prefix) % 64) + blob[start:]


def file_tensors(blob):
    """The raw tensors of a ``.bvit`` file, read with the documented layout (no bvit_jax reader)."""
    (hlen,) = struct.unpack_from("<I", blob, 8)
    header = json.loads(zlib.decompress(blob[12 : 12 + hlen]))
    start = 12 + hlen + (-(12 + hlen) % 64)
    out = {}
    for t in header["tensors"]:
        dt = {"uint32": "<u4", "float32": "<f4"}[t["dtype"]]
        raw = blob[start + t["offset"] : start + t["offset"] + t["nbytes"]]
        out[t["name"]] = (np.frombuffer(raw, dt).reshape(t["shape"]), t.get("bits"))
    return out
