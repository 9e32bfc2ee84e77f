"""The compute dtype of a run: the one place where ``"auto"`` is resolved.

Parameters are float32 in every run; ``config.model.dtype`` (and
``config.distill.teacher_dtype``) choose the dtype the forward and backward
compute in. ``"auto"`` picks bfloat16 on an accelerator, whose matmul units
run bfloat16 at several times their float32 rate, and float32 on CPU, where
XLA's bfloat16 matmuls are slower than float32 (``docs/benchmarks.md``); the
mixed-precision recipe of Micikevicius et al., "Mixed Precision Training"
(ICLR 2018), with bfloat16 (Kalamkar et al., "A Study of BFLOAT16 for Deep
Learning Training", 2019) needing no loss scaling.
"""

from __future__ import annotations

import jax

__all__ = ["COMPUTE_DTYPES", "ACCELERATOR_BACKENDS", "compute_dtype"]

COMPUTE_DTYPES = ("float32", "bfloat16")
"""The compute dtypes a run can name (plus ``"auto"``)."""

ACCELERATOR_BACKENDS = ("gpu", "tpu")
"""Backends on which ``"auto"`` means bfloat16 (JAX's ``jax.default_backend()`` names)."""


def compute_dtype(name: str, backend: str | None = None) -> str:
    """The compute dtype a config value names: ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` -> ``"bfloat16"`` if ``backend`` (default: ``jax.default_backend()``)
    is ``"gpu"`` or ``"tpu"`` (also ``"cuda"`` / ``"rocm"``, the GPU platform
    names), else ``"float32"``; ``"float32"`` and ``"bfloat16"`` are returned
    as they are. Anything else raises ``ValueError``.
    """
    if name in COMPUTE_DTYPES:
        return name
    if name != "auto":
        raise ValueError(f"unknown compute dtype {name!r}; use 'auto', 'float32' or 'bfloat16'")
    backend = jax.default_backend() if backend is None else backend
    return "bfloat16" if backend in (*ACCELERATOR_BACKENDS, "cuda", "rocm") else "float32"
