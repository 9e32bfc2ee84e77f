"""Native CPU kernels for the packed forward: XNOR/AND-popcount matmuls called through XLA's FFI.

The library (``src/bvit_native.cc``, built by :mod:`bvit_jax.deploy.native.build`)
computes, for plane-order packed signs (:mod:`bvit_jax.deploy.bitops`: ``uint32``
words, bit 1 = +1, padding 0 in both operands), grouped over ``g``::

    pc[g, m, j] = sum_w popcount(op(a[g, m, w], b[g, w, j]))
    v = n - 2 * pc                (op = "xor": the +-1 dot product of length n)
    v = 2 * pc - popcount(a[g, m]) (op = "and": sum_k a_k b_k, a in {0, 1}, b in +-1)

and returns ``v`` (:func:`matmul`, int32) or a float32 epilogue of it
(:func:`matmul_scaled`): ``float(v) * alpha + bias`` (``"muladd"``, two float32
roundings, no fused multiply-add), ``float(v) / alpha`` (``"div"``) or
``float(v) * alpha`` (``"mul"``), ``alpha`` and ``bias`` ``(1 or G, 1 or N)``.
:func:`sign_matmul` takes the float activation instead of ``a`` and packs
``x >= 0`` in the plane order itself (the sign-and-pack prologue).

Dispatch: the kernels exist for AVX-512 VPOPCNTDQ (``"avx512"``), AVX2
(``"avx2"``, a nibble-table popcount) and portable C++ (``"portable"``); the best
one the CPU has is used (cpuid), or a lower one named by ``isa=`` or the
environment variable ``BVIT_NATIVE_ISA`` (read when a call is traced). Threads:
``BVIT_NATIVE_THREADS``, default the CPUs the process may use.

Loading: the first :func:`available` (or any op) loads ``_bvit_native.so`` from
the package folder when its stamp matches the sources; else it builds it once
into ``$BVIT_NATIVE_CACHE`` (default ``~/.cache/bvit_jax/native``); when that
fails (no compiler) it logs one warning and :func:`available` is False, so
:func:`bvit_jax.deploy.packed.packed_forward` falls back to its XLA path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ISAS",
    "available",
    "load_error",
    "best_isa",
    "resolve_isa",
    "num_threads",
    "matmul",
    "matmul_scaled",
    "sign_matmul",
]

ISAS = ("portable", "avx2", "avx512")
_MODES = {"muladd": 0, "div": 1, "mul": 2, "fma": 3}
_OPS = {"xor": 0, "and": 1}
_TARGETS = {
    "bvit_popcount_matmul_i32": "BvitMatmulI32",
    "bvit_popcount_matmul_f32": "BvitMatmulF32",
    "bvit_sign_popcount_matmul_f32": "BvitSignMatmulF32",
}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("BVIT_NATIVE_CACHE") or Path.home() / ".cache" / "bvit_jax" / "native")


def _load():
    """The loaded library (ctypes.CDLL) with its FFI targets registered, or None (see the module doc)."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, err = None, None
        from bvit_jax.deploy.native import build as _build  # here: `python -m ...build` imports this package first

        try:
            digest = _build.source_hash()
            path = _build.PACKAGE_DIR / _build.LIB_NAME
            if not _build.is_current(path, digest):
                path = _build.build(_cache_dir() / digest[:16])
            lib = ctypes.CDLL(str(path))
            for target, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        except (OSError, RuntimeError) as e:
            lib, err = None, str(e)
            _log.warning("bvit_jax native kernels unavailable, the packed forward uses its XLA path: %s", e)
        _state["lib"], _state["error"] = lib, err
        return lib


def available() -> bool:
    """Whether the native library is loaded (building it once if needed)."""
    return _load() is not None


def load_error() -> str | None:
    """Why the library could not be loaded (None when it is, or has not been tried)."""
    _load()
    return _state.get("error")


def _lib():
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the bvit_jax native library is not available: {_state.get('error')}")
    return lib


def best_isa() -> str:
    """The best kernel level this CPU runs: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return ISAS[_lib().bvit_native_best_isa()]


def num_threads() -> int:
    """Threads the kernels use (``BVIT_NATIVE_THREADS``, else the CPUs this process may run on)."""
    return int(_lib().bvit_native_threads())


def resolve_isa(isa: str | None = None) -> str:
    """``isa``, else ``$BVIT_NATIVE_ISA``, else :func:`best_isa`; ValueError: unknown, or beyond the CPU."""
    isa = isa or os.environ.get("BVIT_NATIVE_ISA") or None
    best = best_isa()
    if isa is None:
        return best
    if isa not in ISAS:
        raise ValueError(f"unknown native ISA {isa!r} (BVIT_NATIVE_ISA / isa=): expected one of {ISAS}")
    if ISAS.index(isa) > ISAS.index(best):
        raise ValueError(f"native ISA {isa!r} requested, but this CPU supports at most {best!r}")
    return isa


def _grouped(name, x, dtype, what):
    x = jnp.asarray(x)
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name} ({what}), got {x.dtype}")
    if x.ndim == 2:
        return x[None], False
    if x.ndim != 3:
        raise ValueError(f"{name} must be 2-D or grouped 3-D ({what}), got shape {x.shape}")
    return x, True


def _check_words(a, b, nbits):
    a, ga = _grouped("a", a, jnp.uint32, "packed words (G, M, W)")
    b, gb = _grouped("b", b, jnp.uint32, "packed words (G, W, N)")
    if ga != gb or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"a (G, M, W) and b (G, W, N) do not match: {a.shape} and {b.shape}")
    nbits = int(nbits)
    if not 0 < nbits <= 32 * a.shape[2] or -(-nbits // 32) != a.shape[2]:
        raise ValueError(f"n={nbits} bits do not fill {a.shape[2]} words (need ceil(n / 32) words)")
    return a, b, ga, nbits


def _scales(alpha, bias, g, n):
    out = []
    for name, v in (("alpha", alpha), ("bias", bias)):
        v = jnp.asarray(v, jnp.float32)
        if v.ndim == 0:
            v = v.reshape(1, 1)
        elif v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[0] not in (1, g) or v.shape[1] not in (1, n):
            raise ValueError(f"{name} must broadcast as (1 or G={g}, 1 or N={n}), got shape {v.shape}")
        out.append(v)
    return out


def matmul(a, b, n: int, *, op: str = "xor", isa: str | None = None) -> jax.Array:
    """Popcount matmul of packed signs: ``(G, M, W) x (G, W, N) -> (G, M, N)`` int32 (or 2-D without G).

    ``op="xor"``: ``n - 2 * sum_w popcount(a[m, w] ^ b[w, j])`` (as
    :func:`bvit_jax.deploy.bitops.packed_matmul`); ``op="and"``:
    ``2 * sum_w popcount(a[m, w] & b[w, j]) - popcount(a[m])`` (as
    :func:`bvit_jax.deploy.bitops.masked_sign_sum`, with ``b`` holding the
    words along its first axis). ``isa``: see :func:`resolve_isa`.
    """
    if op not in _OPS:
        raise ValueError(f"op must be 'xor' or 'and', got {op!r}")
    a, b, grouped, n = _check_words(a, b, n)
    out = jax.ffi.ffi_call(
        "bvit_popcount_matmul_i32",
        jax.ShapeDtypeStruct((a.shape[0], a.shape[1], b.shape[2]), jnp.int32),
        vmap_method="sequential",
    )(a, b, nbits=np.int64(n), op=np.int64(_OPS[op]), isa=np.int64(ISAS.index(resolve_isa(isa))))
    return out if grouped else out[0]


def matmul_scaled(
    a, b, alpha, bias, n: int, *, op: str = "xor", mode: str = "muladd", isa: str | None = None
) -> jax.Array:
    """:func:`matmul` with a float32 epilogue on the integer ``v``: ``(G, M, N)`` float32.

    ``mode="muladd"``: ``float(v) * alpha + bias`` (each operation rounded to
    float32); ``"div"``: ``float(v) / alpha``; ``"mul"``: ``float(v) * alpha``
    (``bias`` unused). ``alpha``, ``bias``: scalars, ``(N,)`` or ``(1 or G, 1 or N)``.
    """
    if op not in _OPS:
        raise ValueError(f"op must be 'xor' or 'and', got {op!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    a, b, grouped, n = _check_words(a, b, n)
    alpha, bias = _scales(alpha, bias, a.shape[0], b.shape[2])
    out = jax.ffi.ffi_call(
        "bvit_popcount_matmul_f32",
        jax.ShapeDtypeStruct((a.shape[0], a.shape[1], b.shape[2]), jnp.float32),
        vmap_method="sequential",
    )(
        a,
        b,
        alpha,
        bias,
        nbits=np.int64(n),
        op=np.int64(_OPS[op]),
        mode=np.int64(_MODES[mode]),
        isa=np.int64(ISAS.index(resolve_isa(isa))),
    )
    return out if grouped else out[0]


def sign_matmul(x, b, alpha, bias, *, mode: str = "muladd", isa: str | None = None) -> jax.Array:
    """Sign, pack and XNOR-popcount matmul in one call: ``(1 or G, M, K)`` float32 x ``(G, W, N)`` -> ``(G, M, N)``.

    ``v = K - 2 * sum_w popcount(pack(x >= 0)[m, w] ^ b[w, j])`` (``pack``: the
    plane order of :func:`bvit_jax.deploy.bitops.pack_planes`, ``W = ceil(K / 32)``),
    then the epilogue of :func:`matmul_scaled`. A leading 1 in ``x``: every group
    reads the same activation (packed once per row tile).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    x, gx = _grouped("x", x, jnp.float32, "activations (1 or G, M, K)")
    b, gb = _grouped("b", b, jnp.uint32, "packed words (G, W, N)")
    if gx != gb or x.shape[0] not in (1, b.shape[0]) or b.shape[1] != -(-x.shape[2] // 32):
        raise ValueError(f"x (1 or G, M, K) and b (G, ceil(K / 32), N) do not match: {x.shape} and {b.shape}")
    alpha, bias = _scales(alpha, bias, b.shape[0], b.shape[2])
    out = jax.ffi.ffi_call(
        "bvit_sign_popcount_matmul_f32",
        jax.ShapeDtypeStruct((b.shape[0], x.shape[1], b.shape[2]), jnp.float32),
        vmap_method="sequential",
    )(x, b, alpha, bias, mode=np.int64(_MODES[mode]), isa=np.int64(ISAS.index(resolve_isa(isa))))
    return out if gx else out[0]
