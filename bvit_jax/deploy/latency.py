"""What the 1-bit model buys on this machine: the packed forward's latency against the fp32 forward's.

:func:`time_interleaved` times several zero-argument functions in turn
(round-robin, medians), so a machine whose load changes slows every contender
alike and the ratio stays honest; :func:`packed_vs_fp32` applies it to a
packed model (:func:`bvit_jax.deploy.packed.packed_forward`, the native
kernels where they load) and to the full-precision model of the same
architecture (every binarization switch off, ``jax.jit``, float32), on one
batch of random images. The fp32 model's weights are random: its latency does
not depend on their values. ``bvit-export --latency`` prints the result, and
the quick start ends with it; ``benchmarks/packed_inference.py`` measures the
same comparison per variant, batch and dispatch level.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bvit_jax.deploy.packed import PackedModel, packed_forward

__all__ = ["time_interleaved", "packed_vs_fp32"]


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], min_time: float = 1.0, min_reps: int = 5, max_reps: int = 200
) -> dict[str, float]:
    """Median wall time in ms of each zero-argument function, the functions called in turn.

    Each is called twice first (compilation and caches), then the round-robin
    runs until every function has ``min_reps`` calls and ``min_time`` seconds
    per function have passed (or ``max_reps`` calls). ``jax.block_until_ready``
    waits for each result.
    """
    for f in fns.values():
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while True:
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
        n = len(times[next(iter(fns))])
        if n >= max_reps or (n >= min_reps and time.perf_counter() - start >= min_time * len(fns)):
            break
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def packed_vs_fp32(packed: PackedModel, *, batch: int = 1, min_time: float = 1.0, seed: int = 0) -> dict[str, float]:
    """``{"packed_ms", "fp32_ms", "speedup"}``: batch-``batch`` latencies, side by side, and fp32 / packed.

    ``packed_ms``: :func:`~bvit_jax.deploy.packed.packed_forward` (backend
    ``"auto"``: today the XLA ops, docs/export.md). ``fp32_ms``: the
    full-precision ``VisionTransformer`` of ``packed.cfg`` under ``jax.jit``
    in float32 (parameters as arguments, as a trained model is called).
    """
    from bvit_jax.nn.models import VisionTransformer

    cfg = packed.cfg
    fp_model = VisionTransformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(fp_model)
    fp_forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
    images = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    ms = time_interleaved(
        {"packed": lambda: packed_forward(packed, images), "fp32": lambda: fp_forward(state, images)},
        min_time=min_time,
    )
    return {"packed_ms": ms["packed"], "fp32_ms": ms["fp32"], "speedup": ms["fp32"] / ms["packed"]}
