"""1-bit export (:mod:`bvit_jax.deploy.export`): what the file stores, loading, the data settings, the command line."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from bvit_jax import data
from bvit_jax.deploy import bvit_format, export, predict
from bvit_jax.deploy.bitops import from_planes, pack_signs, unpack_signs
from bvit_jax.deploy.bvit_format import PackedFormatError, read_header
from bvit_jax.deploy.export import export_model, load_packed, pack_model
from bvit_jax.deploy.packed import packed_forward
from bvit_jax.nn.binarize import channel_alpha
from bvit_jax.nn.folding import branch_norm_affine, fold_branch_affine
from bvit_jax.nn.models import VisionTransformer, create, get_preset, get_variant, model_variables
from bvit_jax.nn.options import ASM_MODES, BRANCH_BN_EPSILON
from bvit_jax.nn.param_groups import flatten_with_paths, latent_weight_paths
from bvit_jax.nn.summary import size_accounting
from tests.packed_helpers import file_tensors, model_forward, perturb, random_images, sign, with_header
from tests.tolerances import assert_within, gamma_n

# --------------------------------------------------------------------------
# Export and load: the options a file records.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("asm_mode", [m for m in ASM_MODES if m != "token_mean"])
def test_asm_mode_through_the_file(asm_mode):
    """The header records ``asm_mode``; the loaded model runs that form (odd widths, 3 heads)."""
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3)
    opts = dataclasses.replace(get_preset("binaryvit").options, asm_mode=asm_mode)
    model = perturb(VisionTransformer(cfg, opts, rngs=nnx.Rngs(0)))
    x = random_images(cfg)
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


def test_file_without_asm_mode_loads_as_token_mean():
    """A file written before ``asm_mode`` existed (no such key in ``options``) is today's form."""
    model = perturb(create("vit_nano", "binaryvit"))
    blob = export_model(model, data=None, preset="binaryvit")
    assert read_header(blob)["options"]["asm_mode"] == "token_mean"
    old = with_header(blob, lambda h: h["options"].pop("asm_mode"))
    assert "asm_mode" not in read_header(old)["options"]
    loaded = load_packed(old)
    assert loaded.opts.asm_mode == "token_mean"
    x = random_images(model.cfg)
    got = np.asarray(packed_forward(loaded, x))
    np.testing.assert_array_equal(got, np.asarray(packed_forward(load_packed(blob), x)))
    np.testing.assert_allclose(got, model_forward(model, x), rtol=1e-5, atol=1e-6)
    bad = with_header(blob, lambda h: h["options"].update(asm_mode="per_pixel"))
    with pytest.raises(PackedFormatError, match="asm_mode"):
        load_packed(bad)


def test_later_options_are_written_only_when_used_and_a_switch_the_forward_lacks_is_refused_at_load():
    """A default model's header has none of the options added after format version 4 (a version-4 reader takes
    the file); a header that sets one of Le & Li's switches is refused by load_packed, naming it (the packed
    forward does not compute it; the expected tensors alone would accept its parameters)."""
    blob = export_model(perturb(create("vit_nano", "binaryvit")), data=None, preset="binaryvit")
    options = read_header(blob)["options"]
    assert not set(options) & set(export.LATER_OPTIONS) and "asm_mode" in options
    for switch in ("rprelu_everywhere", "attention_bypass"):
        bad = with_header(blob, lambda h, s=switch: h["options"].update({s: True}))
        with pytest.raises(PackedFormatError, match=f"does not compute model.{switch}"):
            load_packed(bad)


@pytest.mark.parametrize("branch_norm", ["affine", "batchnorm"])
def test_foldable_branch_norm_is_folded_into_the_file(branch_norm):
    """``branch_norm='affine'`` / ``'batchnorm'``: no ``norm`` tensors; each linear's alpha and bias hold the
    folded values (``alpha * s``, ``b * s + t`` for the normalisation's inference map ``y * s + t``: the affine's
    scale and bias; a BatchNorm's ``s = scale / sqrt(var + eps)``, ``t = bias - mean * s`` from its running
    statistics), exactly as :func:`fold_branch_affine` computes them; the header records the option; the
    packed forward equals the model bit for bit on CPU (odd widths, through the file)."""
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3)
    opts = dataclasses.replace(get_preset("binaryvit").options, branch_norm=branch_norm)
    model = perturb(VisionTransformer(cfg, opts, rngs=nnx.Rngs(0)))
    variables = dict(flatten_with_paths(model_variables(model)))
    blob = export_model(model, data=None, preset="binaryvit")
    header = read_header(blob)
    assert header["version"] == bvit_format.FORMAT_VERSION == 4 and header["options"]["branch_norm"] == branch_norm
    stored = file_tensors(blob)
    binary = sorted(p[: -len("/kernel")] for p in latent_weight_paths(model))
    assert len(binary) == cfg.depth * 6
    assert not [n for n in stored if "/norm/" in n]  # block norms are norm1 / norm2, the final one norm/
    for base in binary:
        block = base[: -len("/linear")]
        norm = {n: variables.get(f"{block}/norm/{n}") for n in ("scale", "bias", "mean", "var")}
        assert norm["scale"] is not None and block + "/norm/scale" not in stored
        assert (norm["mean"] is not None) == (branch_norm == "batchnorm")
        assert (base + "/bias" in variables) == (branch_norm == "affine")  # no bias before a BatchNorm: b = 0
        lin_bias = variables.get(base + "/bias", jnp.zeros(norm["scale"].shape))
        alpha = channel_alpha(jnp.asarray(variables[base + "/kernel"]))[0]
        fold = branch_norm_affine(branch_norm, {k: v for k, v in norm.items() if v is not None})
        want = fold_branch_affine(alpha, lin_bias, *fold)
        np.testing.assert_array_equal(stored[base + "/alpha"][0], np.asarray(want[0]), err_msg=base)
        np.testing.assert_array_equal(stored[base + "/bias"][0], np.asarray(want[1]), err_msg=base)
        # the folded values are the map's (float64 reference): s = scale (affine; exact) or
        # scale / sqrt(var + eps) (add, sqrt, divide, multiply: gamma_4), t = bias (exact) or bias - mean * s;
        # alpha * s: one more rounding; b * s + t: a product, a sum and t's own (2 for batchnorm).
        f64 = {k: np.asarray(v, np.float64) for k, v in norm.items() if v is not None}
        s, t = f64["scale"], f64["bias"]
        if branch_norm == "batchnorm":
            s = s / np.sqrt(f64["var"] + BRANCH_BN_EPSILON)
            t = t - f64["mean"] * s
        a64, b64 = np.asarray(alpha, np.float64), np.asarray(lin_bias, np.float64)
        assert_within(stored[base + "/alpha"][0], a64 * s, gamma_n(5) * np.abs(a64 * s), base)
        folded = b64 * s + t
        bound = gamma_n(7) * (np.abs(b64 * s) + np.abs(t) + np.abs(f64.get("mean", 0) * s) + np.abs(f64["bias"]))
        assert_within(stored[base + "/bias"][0], folded, bound, base)
    loaded = load_packed(blob)
    assert loaded.opts.branch_norm == branch_norm
    x = random_images(cfg)
    got, ref = np.asarray(packed_forward(loaded, x)), model_forward(model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, ref)
    # the same tensors read as a LayerNorm model are not a valid file of that architecture
    as_ln = with_header(blob, lambda h: h["options"].update(branch_norm="layernorm"))
    with pytest.raises(PackedFormatError, match="missing tensors"):
        load_packed(as_ln)


def test_fp_preset_is_refused():
    with pytest.raises(ValueError, match="binarize both weights and activations"):
        export_model(create("vit_nano", "fp"), data=None)


# --------------------------------------------------------------------------
# The file: size, stored values.
# --------------------------------------------------------------------------


def test_deit_small_file_size_vs_accounting():
    model = create("deit_small", "binaryvit")
    blob = export_model(model, data=None, variant="deit_small", preset="binaryvit")
    acc = size_accounting(model)
    assert acc["binary_params"] == 21_233_664  # the 48 encoder linears (docs/method.md, "Accounting")
    # bvit_jax.nn.summary's full count (every parameter + the alpha scales): the file
    # adds only its compressed header and alignment.
    assert 1.0 < len(blob) / acc["full_bytes"] < 1.01
    # The paper convention leaves out pos-embed, biases, shifts, extra norms: 5.45 MB.
    assert 5.4e6 < acc["paper_bytes"] < 5.5e6
    assert 88.1e6 < acc["fp_model_bytes"] < 88.3e6  # fp DeiT-S: 22.05M params
    assert acc["fp_model_bytes"] / len(blob) > 12
    header = read_header(blob)
    assert header["variant"] == "deit_small" and header["preset"] == "binaryvit" and header["version"] == 4
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


@pytest.mark.parametrize("preset", ["baseline", "binaryvit"])
def test_exported_tensor_values_equal_model_parameters(preset):
    """Every stored value: kernel bits unpack to sign(W), alpha = mean|W| as the model computes it, the rest exact."""
    cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3)
    model = perturb(VisionTransformer(cfg, get_preset(preset).options, rngs=nnx.Rngs(0)))
    params = dict(flatten_with_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    blob = export_model(model, data=None, preset=preset)
    stored, loaded = file_tensors(blob), load_packed(blob)
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
                np.asarray(channel_alpha(jnp.asarray(value)))[0] if model.opts.weight_scale else np.ones(value.shape[1])
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


# --------------------------------------------------------------------------
# Command lines, on a real (tiny) workdir of the trainer.
# --------------------------------------------------------------------------


def test_export_and_predict_command_lines(tmp_path, capsys):
    from bvit_jax.runs.workdir import restore
    from bvit_jax.train.trainer import train_and_evaluate
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
    # --latency: the exported model's packed forward against the fp32 forward of its architecture.
    assert export.main([f"--workdir={run}", f"--out={out2}", "--latency"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "batch-1 latency" in l)
    pattern = r"\(XLA ops\) ([0-9.]+) ms, fp32 forward of this architecture ([0-9.]+) ms: speed-up ([0-9.]+)x"
    m = re.search(pattern, line)
    assert m, line  # "auto" is the XLA path (docs/export.md, "Native runtime")
    packed_ms, fp32_ms, ratio = map(float, m.groups())
    assert packed_ms > 0 and ratio == pytest.approx(fp32_ms / packed_ms, abs=0.06)  # both printed rounded
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


def test_time_interleaved_calls_the_contenders_in_turn_as_often_each():
    """Two warm-up calls each, then round-robin rounds: every contender is called equally often, in turn,
    so a load change on the machine falls on all of them alike."""
    from bvit_jax.deploy.latency import time_interleaved

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    ms = time_interleaved(fns, min_time=0.0, min_reps=4, max_reps=50)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:] == ["a", "b", "c"] * 4
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())
