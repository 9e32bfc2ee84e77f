"""The ``.bvit`` file format (:mod:`bvit_jax.deploy.bvit_format`): truncated and corrupt files, versions, the reader."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from bvit_jax.deploy import bvit_format
from bvit_jax.deploy.bvit_format import PackedFormatError, read_file, read_header, serialize
from bvit_jax.deploy.export import export_model, load_packed
from bvit_jax.deploy.packed import packed_forward
from bvit_jax.nn.models import create
from tests.packed_helpers import file_tensors, perturb, random_images, with_header


@pytest.fixture(scope="module")
def nano_blob():
    return export_model(perturb(create("vit_nano", "baseline")), data=None, preset="baseline")


@pytest.mark.parametrize("cut", [0, 5, 11, 40, -1000, -1])
def test_truncated_file_is_a_clear_error(tmp_path, nano_blob, cut):
    path = tmp_path / "t.bvit"
    path.write_bytes(nano_blob[:cut] if cut else b"")
    with pytest.raises(PackedFormatError, match="truncated"):
        load_packed(path)


def test_corrupt_files_are_clear_errors(nano_blob):
    with pytest.raises(PackedFormatError, match="not a bvit_jax packed model"):
        load_packed(b"PK\x03\x04" + nano_blob[4:])
    flipped = bytearray(nano_blob)
    flipped[-7] ^= 0x10
    with pytest.raises(PackedFormatError, match="CRC-32"):
        load_packed(bytes(flipped))
    with pytest.raises(PackedFormatError, match="trailing"):
        load_packed(nano_blob + b"\0")
    garbled = bytearray(nano_blob)
    garbled[20] ^= 0xFF  # inside the compressed header
    with pytest.raises(PackedFormatError, match="header"):
        load_packed(bytes(garbled))


@pytest.mark.parametrize(
    "version, message", [(99, "version 99 is not supported"), (1, "version 1 was written by an older bvit_jax")]
)
def test_other_format_versions_are_refused(nano_blob, version, message):
    import struct
    import zlib

    header = read_header(nano_blob)
    header["version"] = version
    hlen = struct.unpack_from("<I", nano_blob, 8)[0]
    new = zlib.compress(json.dumps(header).encode())
    blob = nano_blob[:8] + struct.pack("<I", len(new)) + new + nano_blob[12 + hlen :]
    with pytest.raises(PackedFormatError, match=message):
        load_packed(blob)


def test_version_2_file_loads_as_layernorm():
    """Version 2 (before ``branch_norm``): the same tensors as a ``'layernorm'`` file of version 3."""
    model = perturb(create("vit_nano", "binaryvit"))
    blob = export_model(model, data=None, preset="binaryvit")
    old = with_header(blob, lambda h: (h["options"].pop("branch_norm"), h.update(version=2)))
    assert read_header(old)["version"] == 2
    loaded = load_packed(old)
    assert loaded.opts.branch_norm == "layernorm"
    x = random_images(model.cfg)
    np.testing.assert_array_equal(
        np.asarray(packed_forward(loaded, x)), np.asarray(packed_forward(load_packed(blob), x))
    )


def test_read_file_gives_the_stored_tensors_in_file_order(nano_blob):
    """``read_file``: the header, the raw tensors (standard bit order) and the packed lengths of the file."""
    header, tensors, bits = read_file(nano_blob)
    assert header == read_header(nano_blob)
    raw = file_tensors(nano_blob)
    assert list(tensors) == [t["name"] for t in header["tensors"]] and set(tensors) == set(raw)
    for name, (arr, n) in raw.items():
        assert tensors[name].dtype == arr.dtype
        np.testing.assert_array_equal(tensors[name], arr, err_msg=name)
        assert bits.get(name) == n
    assert bits and all(tensors[name].dtype == np.dtype("<u4") for name in bits)


def test_serialize_and_read_file_without_a_model(tmp_path):
    """The container alone: any named float32 / uint32 arrays and header fields round-trip through a file."""
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "w": np.array([[1, 2**32 - 1]], dtype=np.uint32),
        "s": np.float32(2.5).reshape(()),
    }
    header = {"format": bvit_format.FORMAT_NAME, "version": bvit_format.FORMAT_VERSION, "meta": {"k": 1}}
    path = tmp_path / "x.bvit"
    bvit_format.write(serialize(header, tensors, {"w": 40}), path)
    got_header, got, bits = read_file(path)
    assert got_header["meta"] == {"k": 1} and bits == {"w": 40}
    assert [t["offset"] % 16 for t in got_header["tensors"]] == [0, 0, 0]
    for name, arr in tensors.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        np.testing.assert_array_equal(got[name], arr)
    with open(path, "rb") as f:  # a binary file object reads the same
        assert read_file(f)[0] == got_header


def test_a_tensor_table_entry_outside_the_payload_is_refused():
    header = {"format": bvit_format.FORMAT_NAME, "version": bvit_format.FORMAT_VERSION}
    blob = serialize(header, {"a": np.zeros(4, np.float32)}, {})
    bad = with_header(blob, lambda h: h["tensors"][0].update(offset=8))
    with pytest.raises(PackedFormatError, match="corrupt tensor table entry for 'a'"):
        read_file(bad, where="probe")


def test_the_format_does_not_know_the_models():
    """``bvit_jax.deploy.bvit_format`` reads and writes the container only: no model, layer or export import."""
    path = Path(bvit_format.__file__)
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m.startswith("bvit_jax")} == {"bvit_jax.errors"}
