"""The ``.bvit`` file format: a JSON header and raw tensors, checked on reading.

This module only reads and writes the container (header dict plus named
``float32`` / ``uint32`` arrays); it does not know the models. Which tensors a
file of a given architecture holds, and how a model is packed into them, is
:mod:`bvit_jax.deploy.export`; the bit operations, :mod:`bvit_jax.deploy.bitops`.

Bits (see :mod:`bvit_jax.deploy.bitops`): bit ``1`` is ``+1`` (``W >= 0``, so
``sign(0) = +1``), bit ``0`` is ``-1``; element ``k`` of the input axis is bit
``k % 32`` (LSB-first) of word ``k // 32``, i.e. ``numpy.packbits(...,
bitorder="little")`` read as little-endian ``uint32``; padding bits are 0
(:data:`BIT_CONVENTION`, stored in every header).

File format
===========

``.bvit``, version 3 (this reader also loads version 2), all integers little-endian::

    offset 0   8 bytes   magic b"BVITPK\\r\\n"
    offset 8   uint32    header length H
    offset 12  H bytes   header: zlib-compressed UTF-8 JSON
    ...        zeros to the next multiple of 64: payload start
    payload    tensors, each at header["tensors"][i]["offset"] (from the
               payload start, 16-byte aligned), raw C-order bytes

The header records ``format``, ``version``, ``variant``, ``preset``, the
architecture (``config``), the binarization switches (``options``; a file
without ``options.asm_mode``, written before that field existed, loads as
``"token_mean"``, the form it was trained with; one without
``options.branch_norm``, version 2, as ``"layernorm"``), the bit convention, the eval preprocessing (``preprocess``:
``bvit_jax.data.eval_settings(data_config).to_dict()``, the fields of the
training data config that :func:`bvit_jax.data.eval_preprocess` reads, or
null), ``class_names`` (from :func:`bvit_jax.data.class_names`, or given;
null when unknown) and ``meta``, the tensor table (name, dtype, shape, offset,
nbytes, and ``bits`` = true input length for packed kernels), and the
payload size and CRC-32, so that truncated or corrupted files fail loudly
(:class:`PackedFormatError`).

Writing: :func:`serialize` (header dict and tensors -> bytes; it adds the
tensor table, payload size and CRC-32 to the header) and :func:`write`.
Reading: :func:`read_header` (the header only) and :func:`read_file` (header,
tensors and packed lengths, every container check done).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from bvit_jax.errors import UserError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FORMAT_NAME",
    "BIT_CONVENTION",
    "PackedFormatError",
    "serialize",
    "write",
    "read_bytes",
    "parse_header",
    "read_header",
    "read_file",
]

MAGIC = b"BVITPK\r\n"
# 2: attention levels stored as attn_level_raw (c = c_min + softplus(raw));
# 3: options.branch_norm; with a folded branch normalisation, alpha and bias of its linear hold the folded values.
# 4: options.branch_norm may be 'batchnorm' (folded like 'affine'; its linears store the folded bias although the
#    model's linear has none), so a reader that knows only version 3 refuses it by version, not as a corrupt header.
# Version 2 files (no branch_norm: 'layernorm', the same tensors) and version 3 files still load.
FORMAT_VERSION = 4
_OLDEST_READABLE = 2
FORMAT_NAME = "bvit_jax.deploy.packed"
_PREFIX = struct.Struct("<8sI")
_PAYLOAD_ALIGN = 64
_TENSOR_ALIGN = 16
_DTYPES = {"float32": np.dtype("<f4"), "uint32": np.dtype("<u4")}

BIT_CONVENTION = {
    "word": "uint32, little-endian",
    "axis": "input axis of the (in, out) kernel: kernel_bits has shape (ceil(in/32), out)",
    "order": "element k -> word k // 32, bit k % 32 (LSB-first); = numpy.packbits(bitorder='little')",
    "one": "+1 (latent weight >= 0, sign(0) = +1)",
    "zero": "-1",
    "padding": "bits k >= in are 0",
    "layer": "y = alpha * (in - 2 * popcount(xor(x_bits, w_bits))) + bias",
    "branch_norm": "options.branch_norm 'affine' / 'batchnorm': alpha, bias hold alpha * s, bias * s + t "
    "for the normalisation's inference map y * s + t (batchnorm: s = scale / sqrt(var + eps), t = bias - mean * s)",
}


class PackedFormatError(UserError, ValueError):
    """A ``.bvit`` file that cannot be read: not one, truncated, corrupt, or inconsistent."""


# --------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------


def serialize(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray], bits: Mapping[str, int]) -> bytes:
    """The bytes of a ``.bvit`` file holding ``header`` and ``tensors`` (in their order).

    ``tensors``: ``{name: array}``, ``uint32`` arrays stored as ``uint32``,
    everything else as ``float32``; ``bits``: ``{name: n}``, the true input
    length of each packed kernel (recorded in its table entry). The stored
    header is ``header`` plus the tensor table (``tensors``), ``payload_nbytes``
    and ``payload_crc32``.
    """
    table, chunks, offset = [], [], 0
    for name, arr in tensors.items():
        dt = "uint32" if arr.dtype == np.uint32 else "float32"
        data = np.ascontiguousarray(arr, dtype=_DTYPES[dt]).tobytes()
        pad = -offset % _TENSOR_ALIGN
        if pad:
            chunks.append(b"\0" * pad)
            offset += pad
        entry = {"name": name, "dtype": dt, "shape": list(arr.shape), "offset": offset, "nbytes": len(data)}
        if name in bits:
            entry["bits"] = int(bits[name])
        table.append(entry)
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    header = dict(header, tensors=table, payload_nbytes=len(payload), payload_crc32=zlib.crc32(payload))
    hjson = zlib.compress(json.dumps(header, separators=(",", ":")).encode("utf-8"), 9)
    prefix = _PREFIX.pack(MAGIC, len(hjson)) + hjson
    return prefix + b"\0" * (-len(prefix) % _PAYLOAD_ALIGN) + payload


def write(blob: bytes, path: str | os.PathLike) -> None:
    """Write ``blob`` to ``path`` through a temporary file (``path + ".tmp"``, then renamed): never half a file."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------


def read_bytes(source) -> tuple[bytes, str]:
    """``(contents, name)`` of a path, bytes or binary file object; ``name`` is what error messages call it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    if hasattr(source, "read"):
        return source.read(), getattr(source, "name", "<file>")
    with open(source, "rb") as f:
        return f.read(), os.fspath(source)


def parse_header(blob: bytes, where: str) -> tuple[dict[str, Any], int]:
    """``(header, payload start)`` of the file contents ``blob``; ``where`` names the file in errors.

    Checks the magic, that the header is complete and decodes, its
    ``format`` and that its ``version`` is one this reader knows; raises
    :class:`PackedFormatError` otherwise. The payload is not checked (see
    :func:`read_file`).
    """
    if len(blob) < _PREFIX.size or blob[:8] != MAGIC:
        if len(blob) < _PREFIX.size and MAGIC.startswith(blob[:8]):
            raise PackedFormatError(
                f"{where}: truncated .bvit file ({len(blob)} bytes, not even the {_PREFIX.size}-byte prefix)"
            )
        raise PackedFormatError(f"{where}: not a bvit_jax packed model (bad magic {blob[:8]!r}, expected {MAGIC!r})")
    _, hlen = _PREFIX.unpack_from(blob)
    end = _PREFIX.size + hlen
    if end > len(blob):
        raise PackedFormatError(
            f"{where}: truncated .bvit file: the header needs {end} bytes but the file has {len(blob)}"
        )
    try:
        header = json.loads(zlib.decompress(blob[_PREFIX.size : end]).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackedFormatError(f"{where}: corrupt .bvit header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise PackedFormatError(
            f"{where}: corrupt .bvit header (format {header.get('format') if isinstance(header, dict) else None!r})"
        )
    version = header.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PackedFormatError(
            f"{where}: .bvit format version {version!r} is not supported by this bvit_jax "
            f"(reads up to {FORMAT_VERSION})"
        )
    if version < _OLDEST_READABLE:
        raise PackedFormatError(
            f"{where}: .bvit format version {version} was written by an older bvit_jax (this one reads versions "
            f"{_OLDEST_READABLE} to {FORMAT_VERSION}: attention levels are stored as their raw parameter); "
            "export the model again from its workdir with this version"
        )
    return header, end + (-end % _PAYLOAD_ALIGN)


def read_header(source) -> dict[str, Any]:
    """The JSON header of a ``.bvit`` file (path, bytes or binary file object)."""
    blob, where = read_bytes(source)
    return parse_header(blob, where)[0]


def read_file(source, *, where: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, int]]:
    """Read a ``.bvit`` file (path, bytes or binary file object): ``(header, tensors, bits)``.

    ``tensors``: ``{name: array}`` in the table's order, read-only numpy
    views of the payload (``float32`` or ``uint32``, packed kernels in the
    file's standard bit order); ``bits``: ``{name: n}`` for the table entries
    that record a packed input length. ``where`` names the source in error
    messages (default: its path, or ``<bytes>``).

    Checks the magic, version, sizes, CRC-32 and every tensor table entry
    (dtype, shape, offset and size inside the payload); raises
    :class:`PackedFormatError` with the reason otherwise (e.g. ``truncated
    .bvit file: expected N bytes, the file has M``). Whether the tensors are
    those of the recorded architecture is the reader of the model's check
    (:func:`bvit_jax.deploy.export.load_packed`).
    """
    blob, name = read_bytes(source)
    where = name if where is None else where
    header, start = parse_header(blob, where)
    try:
        nbytes = int(header["payload_nbytes"])
        crc = int(header["payload_crc32"])
        table = list(header["tensors"])
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFormatError(f"{where}: corrupt .bvit header ({type(e).__name__}: {e})") from None
    if len(blob) < start + nbytes:
        raise PackedFormatError(
            f"{where}: truncated .bvit file: expected {start + nbytes} bytes, the file has {len(blob)} "
            f"({start + nbytes - len(blob)} missing); re-export or copy it again"
        )
    if len(blob) > start + nbytes:
        raise PackedFormatError(f"{where}: corrupt .bvit file: {len(blob) - start - nbytes} unexpected trailing bytes")
    payload = memoryview(blob)[start:]
    if zlib.crc32(payload) != crc:
        raise PackedFormatError(f"{where}: corrupt .bvit file: payload CRC-32 mismatch (the file was damaged)")

    tensors: dict[str, np.ndarray] = {}
    bits: dict[str, int] = {}
    for entry in table:
        try:
            tname, dt, shape = entry["name"], entry["dtype"], tuple(int(d) for d in entry["shape"])
            off, n = int(entry["offset"]), int(entry["nbytes"])
            n_bits = None if entry.get("bits") is None else int(entry["bits"])
        except (KeyError, TypeError, ValueError) as e:
            raise PackedFormatError(
                f"{where}: corrupt tensor table entry {entry!r} ({type(e).__name__}: {e})"
            ) from None
        if dt not in _DTYPES:
            raise PackedFormatError(f"{where}: tensor {tname!r} has dtype {dt!r}, not one of {sorted(_DTYPES)}")
        if n != int(np.prod(shape)) * _DTYPES[dt].itemsize or off < 0 or off + n > nbytes:
            raise PackedFormatError(f"{where}: corrupt tensor table entry for {tname!r}")
        tensors[tname] = np.frombuffer(payload[off : off + n], dtype=_DTYPES[dt]).reshape(shape)
        if n_bits is not None:
            bits[tname] = n_bits
    return header, tensors, bits
