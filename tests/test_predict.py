"""``python -m bvit_jax.deploy.predict``: the trainer's eval transform, class names, exit status.

Real image files written with PIL; the reference is the real eval iterator
(``bvit_jax.data.create_eval_iterator``) over the same encoded bytes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bvit_jax import data
from bvit_jax.data.sources import FASHION_MNIST_CLASSES
from bvit_jax.deploy import predict
from bvit_jax.deploy.export import export_model, load_packed, pack_model
from bvit_jax.deploy.packed import packed_forward
from bvit_jax.nn.models import create
from tests.tolerances import assert_within, gamma_n


def _smooth_rgb(rng, w, h):
    """A photo-like image (smooth gradients plus noise), so resampling filters matter."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """An odd-size JPEG, a PNG with a varying alpha channel, a grayscale (mode L) JPEG."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    jpeg = d / "photo.jpg"
    Image.fromarray(_smooth_rgb(rng, 203, 137)).save(jpeg, quality=90)
    rgba = _smooth_rgb(rng, 77, 45)
    alpha = np.linspace(0, 255, 77 * 45).reshape(45, 77).astype(np.uint8)
    png = d / "alpha.png"
    Image.fromarray(np.concatenate([rgba, alpha[..., None]], -1), mode="RGBA").save(png)
    gray = d / "gray.jpg"
    Image.fromarray(_smooth_rgb(rng, 59, 91)[..., 1], mode="L").save(gray)
    return [str(jpeg), str(png), str(gray)]


def _center_crop_config():
    """ImageNet's eval recipe at 48 px: shorter side floor(48 / 0.875) = 54 (round would give 55), bicubic."""
    c = data.default_data_config("imagenet2012")
    c.image_size = 48
    c.num_classes = 10
    return c


def _fashion_config():
    c = data.default_data_config("fashion_mnist")  # 28 px, 1 channel, plain bilinear resize, mean 0.286, std 0.353
    c.num_classes = 10
    return c


def _pipeline_images(config, paths):
    """The trainer's eval batch for these files (the real grain eval iterator, encoded bytes as records)."""
    source = [{"image": open(p, "rb").read(), "label": i} for i, p in enumerate(paths)]
    it = data.create_eval_iterator(config, local_batch_size=len(paths), process_index=0, process_count=1, source=source)
    batch = next(iter(it))
    assert batch["mask"].all()
    return batch["image"]


@pytest.mark.parametrize("make_config, variant", [(_center_crop_config, "vit_nano"), (_fashion_config, "vit_micro_28")])
def test_predict_input_equals_eval_pipeline_bit_for_bit(tmp_path, image_files, make_config, variant):
    """predict's tensor for a file == the eval iterator's, for an odd-size JPEG, RGBA PNG and grayscale image.

    The preprocessing comes from the exported file's header (as the command line reads it).
    """
    config = make_config()
    model = create(
        variant,
        "baseline",
        image_size=config.image_size,
        in_channels=config.channels,
        depth=1,
        embed_dim=32,
        num_heads=2,
    )
    path = tmp_path / "m.bvit"
    export_model(model, path, data=config)
    pre = load_packed(path).header["preprocess"]
    assert pre == data.eval_settings(config).to_dict()

    x, errors = predict.load_images(image_files, pre)
    assert errors == [None, None, None]
    ref = _pipeline_images(config, image_files)
    assert x.dtype == ref.dtype == np.float32
    assert x.shape == ref.shape == (3, config.image_size, config.image_size, config.channels)
    for name, got, want in zip(image_files, x, ref):
        np.testing.assert_array_equal(got, want, err_msg=name)
    # ... and the same as the one public eval transform, called on the bytes.
    for name, got in zip(image_files, x):
        np.testing.assert_array_equal(got, data.eval_preprocess(open(name, "rb").read(), config), err_msg=name)


def test_eval_transform_composites_alpha_on_black_and_floors_the_resize():
    """The two differences the old predict had, checked directly against their formulas."""
    from bvit_jax.data.augment import center_crop_box

    s = data.eval_settings(_center_crop_config())
    # Shorter side to floor(48 / 0.875) = 54 (round() would give 55): the 48-px crop spans 137 * 48 / 54 rows.
    _, y0, _, y1 = center_crop_box(203, 137, s.size, s.crop_ratio)
    assert y1 - y0 == pytest.approx(137 * 48 / 54)
    # Alpha: a fully transparent white image is black (composited on black), not white (alpha dropped).
    white = np.zeros((48, 48, 4), np.uint8)
    white[..., :3] = 255
    x = data.eval_preprocess(white, dict(s.to_dict(), eval_crop="resize"))
    want = (0.0 - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
    # Pixel 0: 0/255 and 0 - mean are exact; one division by std (and at most one more rounding if the
    # pipeline multiplies by a reciprocal) -> within gamma_2 of the exact quotient on any CPU (no sums).
    assert_within(x, np.broadcast_to(want, x.shape), gamma_n(2) * np.abs(want), "normalised black pixel")


def _fashion_model_file(tmp_path):
    model = create("vit_micro_28", "baseline", depth=1, embed_dim=32, num_heads=2)
    path = tmp_path / "fmnist.bvit"
    export_model(model, path, data="fashion_mnist")
    return model, path


def _fashion_images(tmp_path, n=3):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = tmp_path / f"item{i}.png"
        Image.fromarray(_smooth_rgb(rng, 28 + 3 * i, 28 + 5 * i)[..., i % 3], mode="L").save(p)
        paths.append(str(p))
    return paths


def test_predict_prints_fashion_mnist_names_and_exits_1_on_an_unreadable_file(tmp_path, capsys):
    _, path = _fashion_model_file(tmp_path)
    header = load_packed(path).header
    assert header["class_names"] == list(FASHION_MNIST_CLASSES)
    assert header["class_names"][0] == "T-shirt/top" and header["class_names"][9] == "Ankle boot"

    good = _fashion_images(tmp_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(open(good[0], "rb").read()[:60])  # a truncated PNG: real bytes, undecodable
    order = [good[0], str(bad), good[1], good[2]]
    assert predict.main([f"--model={path}", "--top_k=3", *order]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [good[0], good[1], good[2]]  # the others after the bad one too
    assert str(bad) in err and "1 of 4 input(s) could not be read" in err

    # Printed names are the model's top classes on the eval pipeline's tensors.
    packed = load_packed(path)
    x = _pipeline_images(_fashion_config(), good)
    probs = np.asarray(jax.nn.softmax(packed_forward(packed, jnp.asarray(x)), axis=-1))
    for line, p in zip(lines, probs):
        preds = line.split(": ", 1)[1].split(", ")
        assert len(preds) == 3
        top_name, top_prob = preds[0].rsplit(" (", 1)
        assert top_name == FASHION_MNIST_CLASSES[int(np.argmax(p))]
        assert abs(float(top_prob.rstrip(")")) - p.max()) < 1e-3

    # --json: one object per input, in order, error only on the bad one; status 1 again.
    assert predict.main([f"--model={path}", "--json", *order]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == order
    assert [r["error"] is not None for r in rows] == [False, True, False, False]
    assert rows[0]["top"][0]["name"] in FASHION_MNIST_CLASSES

    # All readable (plus a missing file: also exit 1).
    assert predict.main([f"--model={path}", *good]) == 0
    capsys.readouterr()
    assert predict.main([f"--model={path}", good[0], str(tmp_path / "missing.jpg")]) == 1
    assert "missing.jpg" in capsys.readouterr().err


def test_file_without_preprocessing_is_refused(tmp_path, capsys):
    model = create("vit_micro_28", "baseline", depth=1, embed_dim=32, num_heads=2)
    path = tmp_path / "bare.bvit"
    export_model(model, path, data=None)
    assert load_packed(path).header["preprocess"] is None
    good = _fashion_images(tmp_path, 1)
    assert predict.main([f"--model={path}", *good]) == 1
    assert "records no eval preprocessing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="records no eval preprocessing"):
        predict.classify(pack_model(model), good)
    # In memory with the data config: the same result as through the file.
    r = predict.classify(pack_model(model, data="fashion_mnist"), good)
    assert r[0]["error"] is None and r[0]["top"][0]["name"] in FASHION_MNIST_CLASSES


def test_imagenet_class_names_come_from_tfds_metadata(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    config = data.default_data_config("imagenet2012")
    names = data.class_names(config)
    assert len(names) == 1000 and names[0] == "n01440764" and names[-1] == "n15075141"
    config.image_size = 32
    model = create("vit_nano", "baseline", image_size=32, num_classes=1000, depth=1)
    header = load_packed(export_model(model, data=config)).header
    assert header["class_names"] == names
    assert header["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert header["preprocess"]["std"] == [0.229, 0.224, 0.225]
