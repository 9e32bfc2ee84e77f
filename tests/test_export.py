"""1-bit export, the .bvit file format, XNOR-popcount ops and packed inference."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from bvit_jax import data, export, predict
from bvit_jax.binarize import weight_alpha
from bvit_jax.export import PackedFormatError, export_model, load_packed, pack_model, read_header, size_accounting
from bvit_jax.layers import ASM_MODES, BRANCH_NORMS, fold_branch_affine
from bvit_jax.models import VisionTransformer, create, get_preset, get_variant
from bvit_jax.packed import (
    from_planes,
    masked_sign_sum,
    num_words,
    pack_bits_planes,
    pack_planes,
    pack_signs,
    packed_forward,
    packed_matmul,
    packed_sign_dot,
    to_planes,
    unpack_signs,
)
from bvit_jax.param_groups import flatten_with_paths, latent_weight_paths
from tests.tolerances import U32, assert_within, gamma_n

BINARY_PRESETS = ["baseline", "baseline+grs", "baseline+asm", "binaryvit"]
ASM_PRESETS = [p for p in BINARY_PRESETS if get_preset(p).options.asm]
# (preset, asm_mode): every preset in today's form, and every other ASM form on each ASM preset
PRESET_MODES = [(p, "token_mean") for p in BINARY_PRESETS] + [
    (p, m) for p in ASM_PRESETS for m in ASM_MODES if m != "token_mean"
]


def sign(x):
    return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.float32)


def perturb(model, seed=1, scale=0.1):
    """Move every parameter off its init (shifts, gammas, LN, levels), as training would.

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
    return model


# --------------------------------------------------------------------------
# Packing.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 100, 384])
def test_pack_roundtrip_and_bit_order(n):
    rng = np.random.default_rng(n)
    w = rng.standard_normal((n, 7)).astype(np.float32)
    w[rng.random(w.shape) < 0.1] = 0.0  # sign(0) = +1
    words = pack_signs(w, axis=0)
    assert words.dtype == np.uint32 and words.shape == (num_words(n), 7)
    np.testing.assert_array_equal(unpack_signs(words, n, axis=0), sign(w))
    # Bit convention: element k is bit k % 32 of word k // 32; padding bits are 0.
    for k in range(n):
        assert ((words[k // 32, 0] >> np.uint32(k % 32)) & 1) == (w[k, 0] >= 0)
    if n % 32:
        assert words[-1, 0] >> np.uint32(n % 32) == 0
    # Same bytes as numpy.packbits(bitorder="little").
    b = np.packbits(w[:, 0] >= 0, bitorder="little")
    np.testing.assert_array_equal(words[:, 0].astype("<u4").view(np.uint8)[: b.size], b)
    # Standard <-> plane order, and the on-device packer agrees with the plane order.
    planes = to_planes(words, n, axis=0)
    np.testing.assert_array_equal(from_planes(planes, n, axis=0), words)
    np.testing.assert_array_equal(np.asarray(pack_planes(jnp.asarray(w.T))), planes.T)


def test_pack_signs_last_axis_batch():
    x = np.random.default_rng(0).standard_normal((2, 3, 45)).astype(np.float32)
    np.testing.assert_array_equal(unpack_signs(pack_signs(x), 45), sign(x))


@pytest.mark.parametrize("k", [20, 32, 100, 384])
def test_packed_matmul_equals_float_pm1_matmul(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((3, 11, k)).astype(np.float32)
    w = rng.standard_normal((k, 13)).astype(np.float32)
    ref = (sign(x) @ sign(w)).astype(np.int32)
    a, b = pack_planes(jnp.asarray(x)), jnp.asarray(to_planes(pack_signs(w, axis=0), k, axis=0))
    got = jax.jit(packed_matmul, static_argnums=2)(a, b, k)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), ref)
    # Isolated kernel (runtime live flag) and the grouped form give the same integers.
    live = jnp.bool_(True)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b, l: packed_matmul(a, b, k, live=l))(a, b, live)), ref)
    g = jax.jit(lambda a, b: packed_matmul(a, b, k))(jnp.stack([a.reshape(-1, a.shape[-1])] * 2), jnp.stack([b, b]))
    np.testing.assert_array_equal(np.asarray(g[1]).reshape(ref.shape), ref)


@pytest.mark.parametrize("d,n", [(12, 17), (64, 40), (20, 197)])
def test_attention_popcount_matmuls_exact(d, n):
    rng = np.random.default_rng(d + n)
    q = rng.standard_normal((2, 3, n, d)).astype(np.float32)
    k = rng.standard_normal((2, 3, n, d)).astype(np.float32)
    scores = jax.jit(lambda q, k: packed_sign_dot(pack_planes(q), pack_planes(k), d))(q, k)
    np.testing.assert_array_equal(np.asarray(scores), np.einsum("bhqd,bhkd->bhqk", sign(q), sign(k)).astype(np.int32))
    m = rng.random((2, 3, n, n)) > 0.7
    pv = jax.jit(lambda m, v: masked_sign_sum(pack_bits_planes(m), pack_planes(jnp.swapaxes(v, -1, -2))))(m, k)
    np.testing.assert_array_equal(
        np.asarray(pv), np.einsum("bhqk,bhkd->bhqd", m.astype(np.float32), sign(k)).astype(np.int32)
    )


# --------------------------------------------------------------------------
# Packed forward vs the training-time forward.
# --------------------------------------------------------------------------


def model_forward(model, x):
    """``model(x)`` under one jit (compiles faster than op-by-op dispatch)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def _images(cfg, b=2, seed=3):
    return jax.random.normal(jax.random.key(seed), (b, cfg.image_size, cfg.image_size, cfg.in_channels))


@pytest.mark.parametrize("branch_norm", BRANCH_NORMS)
@pytest.mark.parametrize("preset, asm_mode", PRESET_MODES)
def test_packed_forward_matches_model(preset, asm_mode, branch_norm):
    model = perturb(create("vit_nano", preset, asm_mode=asm_mode, branch_norm=branch_norm))
    assert model.opts.asm_mode == asm_mode and pack_model(model).opts.asm_mode == asm_mode
    assert pack_model(model).opts.branch_norm == branch_norm
    x = _images(model.cfg)
    ref = model_forward(model, x)
    got = np.asarray(packed_forward(pack_model(model), x))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_packed_forward_matches_fresh_model():
    """Unperturbed: ``P_b V_b`` is often exactly 0 and meets an unshifted sign; the model computes
    that exact 0 too (integer 0 times ``c``), not rounding noise, so it takes ``sign(0) = +1`` too."""
    model = create("vit_nano", "binaryvit", depth=4)
    x = _images(model.cfg, b=4)
    np.testing.assert_allclose(
        np.asarray(packed_forward(pack_model(model), x)), model_forward(model, x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("branch_norm", BRANCH_NORMS)
@pytest.mark.parametrize("preset, asm_mode", [("baseline", "token_mean")] + [("binaryvit", m) for m in ASM_MODES])
def test_packed_forward_reproduces_every_sign(preset, asm_mode, branch_norm):
    """Depth 4, odd widths: both forwards binarize every activation identically and give the same logits.

    Every ``asm_mode``: the packed forward computes the shift's statistic with the
    model's own function (:func:`bvit_jax.layers.asm_statistic`), in the same order.

    The model computes its binary matmuls as exact integers scaled afterwards
    and its LayerNorms with the packed forward's function, so every sign input
    is the same float32 value (a sign can only differ when one value is
    rounded differently near 0). Under jit on CPU the logits are bit-identical.
    With ``branch_norm='affine'`` the file holds the affine folded into each
    linear's scale and bias and the model computes that folded form itself
    (:func:`bvit_jax.layers.fold_branch_affine`), so the same holds.
    """
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3, depth=4)
    opts = dataclasses.replace(get_preset(preset).options, asm_mode=asm_mode, branch_norm=branch_norm)
    model = perturb(VisionTransformer(cfg, opts, rngs=nnx.Rngs(0)))
    x = _images(cfg, b=4)
    graphdef, state = nnx.split(model)
    ref, inter = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, capture=True))(state, x)
    got, bits = packed_forward(pack_model(model), x, capture=True)
    assert sorted(bits) == sorted(inter) and len(bits) == cfg.depth * 9  # 6 linears + Q, K, V per block
    for path, b in bits.items():
        np.testing.assert_array_equal(np.asarray(b), np.asarray(inter[path]["shifted"]) >= 0, err_msg=path)
    ref, got = np.asarray(ref), np.asarray(got)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, ref)


def test_packed_forward_odd_widths_through_file():
    # embed 36 (not a multiple of 32), head dim 12, MLP 144, 37 tokens (2 mask words).
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3)
    model = perturb(VisionTransformer(cfg, get_preset("binaryvit").options, rngs=nnx.Rngs(0)))
    x = _images(cfg)
    ref = model_forward(model, x)
    loaded = load_packed(export_model(model, data=None, preset="binaryvit"))
    assert loaded.cfg == cfg
    np.testing.assert_allclose(np.asarray(packed_forward(loaded, x)), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(packed_forward(loaded, x, attention="float")), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected images of shape"):
        packed_forward(loaded, x[:, :16])


@pytest.mark.parametrize("asm_mode", [m for m in ASM_MODES if m != "token_mean"])
def test_asm_mode_through_the_file(asm_mode):
    """The header records ``asm_mode``; the loaded model runs that form (odd widths, 3 heads)."""
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3)
    opts = dataclasses.replace(get_preset("binaryvit").options, asm_mode=asm_mode)
    model = perturb(VisionTransformer(cfg, opts, rngs=nnx.Rngs(0)))
    x = _images(cfg)
    blob = export_model(model, data=None, preset="binaryvit")
    assert read_header(blob)["options"]["asm_mode"] == asm_mode
    loaded = load_packed(blob)
    assert loaded.opts.asm_mode == asm_mode
    ref = model_forward(model, x)
    got = np.asarray(packed_forward(loaded, x))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, ref)
    # the same tensors run in today's form give other logits: the file's mode is the one applied
    today = dataclasses.replace(loaded, opts=dataclasses.replace(loaded.opts, asm_mode="token_mean"))
    assert not np.array_equal(np.asarray(packed_forward(today, x)), got)


def _with_header(blob, edit):
    """``blob`` with its JSON header replaced by ``edit(header)`` (payload unchanged)."""
    import struct
    import zlib

    header = read_header(blob)
    edit(header)
    hlen = struct.unpack_from("<I", blob, 8)[0]
    start = 12 + hlen + (-(12 + hlen) % 64)
    new = zlib.compress(json.dumps(header).encode())
    prefix = blob[:8] + struct.pack("<I", len(new)) + new
    return prefix + b"\0" * (-len(prefix) % 64) + blob[start:]


def test_file_without_asm_mode_loads_as_token_mean():
    """A file written before ``asm_mode`` existed (no such key in ``options``) is today's form."""
    model = perturb(create("vit_nano", "binaryvit"))
    blob = export_model(model, data=None, preset="binaryvit")
    assert read_header(blob)["options"]["asm_mode"] == "token_mean"
    old = _with_header(blob, lambda h: h["options"].pop("asm_mode"))
    assert "asm_mode" not in read_header(old)["options"]
    loaded = load_packed(old)
    assert loaded.opts.asm_mode == "token_mean"
    x = _images(model.cfg)
    got = np.asarray(packed_forward(loaded, x))
    np.testing.assert_array_equal(got, np.asarray(packed_forward(load_packed(blob), x)))
    np.testing.assert_allclose(got, model_forward(model, x), rtol=1e-5, atol=1e-6)
    bad = _with_header(blob, lambda h: h["options"].update(asm_mode="per_pixel"))
    with pytest.raises(PackedFormatError, match="asm_mode"):
        load_packed(bad)


def test_affine_branch_is_folded_into_the_file():
    """``branch_norm='affine'``: no ``norm`` tensors; each linear's alpha and bias hold the folded values
    (``alpha * scale``, ``b * scale + bias``, exactly as :func:`fold_branch_affine` computes them); the header
    records the option; the packed forward equals the model bit for bit on CPU (odd widths, through the file)."""
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3)
    opts = dataclasses.replace(get_preset("binaryvit").options, branch_norm="affine")
    model = perturb(VisionTransformer(cfg, opts, rngs=nnx.Rngs(0)))
    params = dict(flatten_with_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    blob = export_model(model, data=None, preset="binaryvit")
    header = read_header(blob)
    assert header["version"] == export.FORMAT_VERSION == 3 and header["options"]["branch_norm"] == "affine"
    stored = _file_tensors(blob)
    binary = sorted(p[: -len("/kernel")] for p in latent_weight_paths(model))
    assert len(binary) == cfg.depth * 6
    assert not [n for n in stored if "/norm/" in n]  # block norms are norm1 / norm2, the final one norm/
    for base in binary:
        block = base[: -len("/linear")]
        assert block + "/norm/scale" in params and block + "/norm/scale" not in stored
        alpha = weight_alpha(jnp.asarray(params[base + "/kernel"]))[0]
        want = fold_branch_affine(
            alpha, params[base + "/bias"], params[block + "/norm/scale"], params[block + "/norm/bias"]
        )
        np.testing.assert_array_equal(stored[base + "/alpha"][0], np.asarray(want[0]), err_msg=base)
        np.testing.assert_array_equal(stored[base + "/bias"][0], np.asarray(want[1]), err_msg=base)
        # the folded values are the affine of the linear (float32: alpha*scale one rounding; b*scale + bias two)
        scale = np.asarray(params[block + "/norm/scale"], np.float64)
        assert_within(stored[base + "/alpha"][0], np.asarray(alpha, np.float64) * scale, U32 * np.abs(alpha * scale))
        bs = np.asarray(params[base + "/bias"], np.float64) * scale
        b2 = bs + np.asarray(params[block + "/norm/bias"], np.float64)
        assert_within(stored[base + "/bias"][0], b2, gamma_n(2) * (np.abs(b2) + np.abs(bs)), base)
    loaded = load_packed(blob)
    assert loaded.opts.branch_norm == "affine"
    x = _images(cfg)
    got, ref = np.asarray(packed_forward(loaded, x)), model_forward(model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, ref)
    # the same tensors read as a LayerNorm model are not a valid file of that architecture
    as_ln = _with_header(blob, lambda h: h["options"].update(branch_norm="layernorm"))
    with pytest.raises(PackedFormatError, match="missing tensors"):
        load_packed(as_ln)


def test_version_2_file_loads_as_layernorm():
    """Version 2 (before ``branch_norm``): the same tensors as a ``'layernorm'`` file of version 3."""
    model = perturb(create("vit_nano", "binaryvit"))
    blob = export_model(model, data=None, preset="binaryvit")
    old = _with_header(blob, lambda h: (h["options"].pop("branch_norm"), h.update(version=2)))
    assert read_header(old)["version"] == 2
    loaded = load_packed(old)
    assert loaded.opts.branch_norm == "layernorm"
    x = _images(model.cfg)
    np.testing.assert_array_equal(
        np.asarray(packed_forward(loaded, x)), np.asarray(packed_forward(load_packed(blob), x))
    )


def test_integer_dot_of_a_model_layer_is_exact():
    """The popcount dot of a real layer equals sign(x - shift) @ sign(W) exactly."""
    model = perturb(create("vit_nano", "binaryvit"))
    _, inter = model(_images(model.cfg), capture=True)
    pk = pack_model(model)
    params = dict(flatten_with_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    for path in ["blocks/0/attn/q/linear", "blocks/1/mlp/fc2/linear"]:
        shifted = np.asarray(inter[path + "/act"]["shifted"])
        kernel = np.asarray(params[path + "/kernel"])
        ref = (sign(shifted) @ sign(kernel)).astype(np.int32)
        got = packed_matmul(pack_planes(jnp.asarray(shifted)), pk.tensors[path + "/kernel_bits"], shifted.shape[-1])
        np.testing.assert_array_equal(np.asarray(got), ref)


def test_fp_preset_is_refused():
    with pytest.raises(ValueError, match="binarize both weights and activations"):
        export_model(create("vit_nano", "fp"), data=None)


# --------------------------------------------------------------------------
# The file: size, header, corruption.
# --------------------------------------------------------------------------


def test_deit_small_file_size_vs_accounting():
    model = create("deit_small", "binaryvit")
    blob = export_model(model, data=None, variant="deit_small", preset="binaryvit")
    acc = size_accounting(model)
    assert acc["binary_params"] == 21_233_664  # the 48 encoder linears (docs/method.md, "Accounting")
    # bvit_jax.summary's full count (every parameter + the alpha scales): the file
    # adds only its compressed header and alignment.
    assert 1.0 < len(blob) / acc["full_bytes"] < 1.01
    # The paper convention leaves out pos-embed, biases, shifts, extra norms: 5.45 MB.
    assert 5.4e6 < acc["paper_bytes"] < 5.5e6
    assert 88.1e6 < acc["fp_model_bytes"] < 88.3e6  # fp DeiT-S: 22.05M params
    assert acc["fp_model_bytes"] / len(blob) > 12
    header = read_header(blob)
    assert header["variant"] == "deit_small" and header["preset"] == "binaryvit" and header["version"] == 3
    kb = [t for t in header["tensors"] if t["name"] == "blocks/0/mlp/fc2/linear/kernel_bits"][0]
    assert kb["dtype"] == "uint32" and kb["shape"] == [48, 384] and kb["bits"] == 1536


@pytest.fixture(scope="module")
def nano_blob():
    return export_model(perturb(create("vit_nano", "baseline")), data=None, preset="baseline")


def test_roundtrip_file(tmp_path, nano_blob):
    path = tmp_path / "m.bvit"
    path.write_bytes(nano_blob)
    a, b = load_packed(path), load_packed(nano_blob)
    assert a.tensors.keys() == b.tensors.keys()
    assert a.header["preset"] == "baseline" and a.header["bits"]["one"].startswith("+1")


def _file_tensors(blob):
    """The raw tensors of a ``.bvit`` file, read with the documented layout (no bvit_jax reader)."""
    import struct
    import zlib

    (hlen,) = struct.unpack_from("<I", blob, 8)
    header = json.loads(zlib.decompress(blob[12 : 12 + hlen]))
    start = 12 + hlen + (-(12 + hlen) % 64)
    out = {}
    for t in header["tensors"]:
        dt = {"uint32": "<u4", "float32": "<f4"}[t["dtype"]]
        raw = blob[start + t["offset"] : start + t["offset"] + t["nbytes"]]
        out[t["name"]] = (np.frombuffer(raw, dt).reshape(t["shape"]), t.get("bits"))
    return out


@pytest.mark.parametrize("preset", ["baseline", "binaryvit"])
def test_exported_tensor_values_equal_model_parameters(preset):
    """Every stored value: kernel bits unpack to sign(W), alpha = mean|W| as the model computes it, the rest exact."""
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3)
    model = perturb(VisionTransformer(cfg, get_preset(preset).options, rngs=nnx.Rngs(0)))
    params = dict(flatten_with_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    blob = export_model(model, data=None, preset=preset)
    stored, loaded = _file_tensors(blob), load_packed(blob)
    binary = {p[: -len("/kernel")] for p in latent_weight_paths(model)}
    assert len(binary) == cfg.depth * 6  # q, k, v, proj, fc1, fc2
    assert set(stored) == {p for p in params if not (p.endswith("/kernel") and p[: -len("/kernel")] in binary)} | {
        b + "/kernel_bits" for b in binary
    } | {b + "/alpha" for b in binary}
    for path, value in params.items():
        value = np.asarray(value)
        base = path[: -len("/kernel")]
        if base in binary and path.endswith("/kernel"):
            words, n = stored[base + "/kernel_bits"]
            assert n == value.shape[0] and words.dtype == np.dtype("<u4")
            np.testing.assert_array_equal(unpack_signs(words, n, axis=0), sign(value), err_msg=path)
            np.testing.assert_array_equal(words, pack_signs(value, axis=0), err_msg=path)
            # The loaded model holds the same bits (plane order at run time).
            runtime = np.asarray(loaded.tensors[base + "/kernel_bits"])
            np.testing.assert_array_equal(from_planes(runtime, n, axis=0), words, err_msg=path)
            alpha = stored[base + "/alpha"][0]
            want = (
                np.asarray(weight_alpha(jnp.asarray(value)))[0] if model.opts.weight_scale else np.ones(value.shape[1])
            )
            np.testing.assert_array_equal(alpha, want.astype(np.float32), err_msg=path)
            if model.opts.weight_scale:  # numpy's float32 mean sums in another order than XLA's:
                n = value.shape[0]  # each is within gamma_{n+1} * alpha of the exact mean
                mean = np.abs(value).mean(0)
                assert_within(alpha, mean, 2 * gamma_n(n + 1) * np.abs(value).astype(np.float64).mean(0), path)
            else:
                np.testing.assert_array_equal(alpha, 1.0, err_msg=path)
        else:
            got, bits = stored[path]
            assert bits is None
            np.testing.assert_array_equal(got, value.astype(np.float32), err_msg=path)
            np.testing.assert_array_equal(np.asarray(loaded.tensors[path]), value, err_msg=path)


# --------------------------------------------------------------------------
# Stored preprocessing and class names: from the data config, never guessed.
# --------------------------------------------------------------------------


def _micro(variant, **kw):
    return create(variant, "baseline", depth=1, embed_dim=32, num_heads=2, **kw)


@pytest.mark.parametrize(
    "name, variant, mean, std",
    [
        ("fashion_mnist", "vit_micro_28", [0.286], [0.353]),
        ("mnist", "vit_micro_28", [0.1307], [0.3081]),
        ("cifar10", "vit_micro_32", [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    ],
)
def test_export_stores_the_training_normalisation(name, variant, mean, std):
    """Small data sets: their own statistics (not 0.5 or ImageNet's), from the data config, in file and in memory."""
    cfg = data.default_data_config(name)
    model = _micro(variant)
    want = data.eval_settings(cfg).to_dict()
    for header in (
        read_header(export_model(model, data=cfg)),
        read_header(export_model(model, data=name)),
        pack_model(model, data=cfg).header,
    ):
        pre = header["preprocess"]
        assert pre == want
        assert pre["mean"] == mean and pre["std"] == std
        assert (pre["image_size"], pre["channels"]) == (model.cfg.image_size, model.cfg.in_channels)
        assert (pre["eval_crop"], pre["interpolation"]) == ("resize", "bilinear")
    # A changed config is stored as changed (the file follows the config, not the data set's name).
    cfg.mean, cfg.std, cfg.interpolation = (0.25,), (0.5,), "bicubic"
    pre = read_header(export_model(model, data=cfg))["preprocess"]
    assert pre["mean"] == [0.25] * len(mean) and pre["std"] == [0.5] * len(std) and pre["interpolation"] == "bicubic"


def test_export_needs_a_data_config_that_fits_the_model():
    model = _micro("vit_micro_28")
    with pytest.raises(TypeError, match="needs data="):
        export_model(model)
    with pytest.raises(ValueError, match="32 px, 3 channel"):
        export_model(model, data="cifar10")
    header = read_header(export_model(model, data=None))
    assert header["preprocess"] is None and header["class_names"] is None
    # Class names: the data set's, unless given.
    assert read_header(export_model(model, data="fashion_mnist"))["class_names"][:2] == ["T-shirt/top", "Trouser"]
    names = [f"c{i}" for i in range(10)]
    assert read_header(export_model(model, data="fashion_mnist", class_names=names))["class_names"] == names


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


# --------------------------------------------------------------------------
# Command lines, on a real (tiny) workdir of the trainer.
# --------------------------------------------------------------------------


def test_export_and_predict_command_lines(tmp_path, capsys):
    from bvit_jax.train import train_and_evaluate
    from bvit_jax.workdir import restore
    from tests.train_helpers import tiny_config

    cfg = tiny_config("binaryvit", total_steps=2, checkpoint_every_steps=2, distill__enabled=False)
    run = tmp_path / "run"
    train_and_evaluate(cfg, run)
    _, model, _ = restore(run)
    names = [f"class{i}" for i in range(10)]
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(n + "\n" for n in names))
    out = tmp_path / "model.bvit"
    assert export.main([f"--workdir={run}", f"--out={out}", f"--labels={labels}"]) == 0
    assert "accounting, full count" in capsys.readouterr().out

    pk = load_packed(out)
    assert pk.header["class_names"] == names
    mean, std = float(cfg.data.mean[0]), float(cfg.data.std[0])
    assert (mean, std) == (0.286, 0.353)  # Fashion-MNIST's own statistics
    assert pk.header["preprocess"]["mean"] == [mean] and pk.header["preprocess"]["std"] == [std]
    assert pk.header["preprocess"] == data.eval_settings(cfg.data).to_dict()
    # Without --labels: the data set's class names.
    out2 = tmp_path / "model_names.bvit"
    assert export.main([f"--workdir={run}", f"--out={out2}"]) == 0
    capsys.readouterr()
    assert read_header(out2)["class_names"][0] == "T-shirt/top" and len(read_header(out2)["class_names"]) == 10

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L").save(p)
        paths.append(str(p))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert predict.main([f"--model={out}", "--top_k=2", "--json", *paths, str(bad)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in lines] == paths + [str(bad)]
    assert lines[2]["error"] and not lines[0]["error"]
    # The CLI's probabilities are the model's on the same preprocessing.
    x = np.stack([(np.asarray(Image.open(p), np.float32)[..., None] / 255 - mean) / std for p in paths])
    probs = np.asarray(jax.nn.softmax(model_forward(model, jnp.asarray(x)), axis=-1))
    for r, p in zip(lines, probs):
        assert r["top"][0]["name"] == names[int(np.argmax(p))]
        np.testing.assert_allclose(r["top"][0]["prob"], p.max(), rtol=1e-4)
