"""Unit tests of the augmentation ops: crops, draft decode, RandAugment,
random erasing. (Mixup / CutMix: ``tests/test_data_mixup.py``.)"""

import io

import numpy as np
import pytest
from PIL import Image

from bvit_jax.data import augment, indexing
from bvit_jax.data import decode as decode_lib


def _photo(w, h, seed=0):
    """A smooth colour image with some texture, like a downscaled photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
    img = img + rng.integers(-8, 9, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _jpeg(img, quality=92):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_random_resized_crop_box_within_bounds_and_ranges():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, w, h = augment.random_resized_crop_box(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        areas.append(w * h / (500 * 375))
        ratios.append(w / h)
    assert min(areas) >= 0.08 * 0.9 and max(areas) <= 1.0
    assert min(ratios) >= 0.75 * 0.95 and max(ratios) <= 4 / 3 * 1.05
    assert np.mean(areas) > 0.3  # uniform in [0.08, 1] minus rejections
    # Fallback: a very wide image gets a centred crop of aspect 4/3.
    rng = np.random.default_rng(1)
    left, top, w, h = augment.random_resized_crop_box(1000, 10, rng, scale=(0.99, 1.0), ratio=(0.75, 4 / 3))
    assert (w, h) == (13, 10) and left == (1000 - 13) // 2


def test_center_crop_box_equals_resize_then_crop():
    # torchvision-style Resize(256) + CenterCrop(224) == one resize of the box.
    for w, h in ((500, 375), (375, 500), (640, 427), (300, 300)):
        img = _photo(w, h)
        short = min(w, h)
        new = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        ref = img.resize(new, Image.BICUBIC)
        top = int(round((new[1] - 224) / 2.0))
        left = int(round((new[0] - 224) / 2.0))
        ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), np.int16)
        box = augment.center_crop_box(w, h, 224, 0.875)
        got = np.asarray(img.resize((224, 224), Image.BICUBIC, box=box), np.int16)
        assert np.abs(got - ref).max() <= 1, (w, h, short)


def test_jpeg_draft_is_close_to_full_decode():
    img = _photo(2000, 1500)
    data = _jpeg(img)
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    diffs, drafted = [], 0
    for _ in range(10):
        a = augment.random_resized_crop(decode_lib.open_image(data), 224, rng_a, scale=(0.5, 1.0), use_draft=True)
        b = augment.random_resized_crop(decode_lib.open_image(data), 224, rng_b, scale=(0.5, 1.0), use_draft=False)
        diffs.append(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())
    probe = decode_lib.open_image(data)
    drafted = decode_lib.draft(probe, 3, (500, 375))
    assert drafted == 0.25  # 2000 // 4 = 500 >= 500: decoded at 1/4 scale
    assert max(diffs) < 3.0, diffs  # mean abs difference in grey levels
    # Eval with draft: the 2000 px image decodes at 1/4 (shorter side >= 256).
    e1 = augment.resize_center_crop(decode_lib.open_image(data), 224, use_draft=True)
    e2 = augment.resize_center_crop(decode_lib.open_image(data), 224, use_draft=False)
    assert np.abs(np.asarray(e1, np.float32) - np.asarray(e2, np.float32)).mean() < 3.0


def test_randaugment_spec_parsing():
    ra = augment.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.magnitude_max, ra.increasing, ra.prob) == (
        2,
        9.0,
        0.5,
        10.0,
        True,
        0.5,
    )
    assert len(ra.ops) == 15 and "SolarizeIncreasing" in ra.ops
    ra = augment.RandAugment.from_string("rand-n3-m5")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.increasing) == (3, 5.0, 0.0, False)
    with pytest.raises(ValueError):
        augment.RandAugment.from_string("rand-q4")
    with pytest.raises(ValueError):
        augment.RandAugment.from_string("augmix-m3")
    rng = np.random.default_rng(0)
    ms = [ra.sample_magnitude(rng) for _ in range(10)]
    assert ms == [5.0] * 10
    ra = augment.RandAugment.from_string("rand-m9-mstd0.5")
    ms = np.array([ra.sample_magnitude(rng) for _ in range(4000)])
    assert abs(ms.mean() - 9.0) < 0.05 and abs(ms.std() - 0.5) < 0.05
    assert ms.max() <= 10.0


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_randaugment_op_runs_and_keeps_size(mode):
    img = _photo(64, 48).convert(mode)
    rng = np.random.default_rng(0)
    ctx = augment.OpContext(fill=(124, 116, 104) if mode == "RGB" else 115, interpolation=Image.BICUBIC)
    for name, op in augment.RANDAUGMENT_OPS.items():
        for level in (0.0, 0.5, 0.9, 1.0):  # 1.0 = magnitude_max
            out = op(img, level, rng, ctx)
            assert out.size == img.size and out.mode == mode, (name, level)
    # Known values: Invert; SolarizeIncreasing at level 0.9 inverts pixels >=
    # 256 - 230 = 26; PosterizeIncreasing keeps 4 - 3 = 1 bit.
    a = np.asarray(img)
    np.testing.assert_array_equal(np.asarray(augment.RANDAUGMENT_OPS["Invert"](img, 0, rng, ctx)), 255 - a)
    sol = np.asarray(augment.RANDAUGMENT_OPS["SolarizeIncreasing"](img, 0.9, rng, ctx))
    np.testing.assert_array_equal(sol, np.where(a >= 26, 255 - a, a))
    post = np.asarray(augment.RANDAUGMENT_OPS["PosterizeIncreasing"](img, 0.9, rng, ctx))
    np.testing.assert_array_equal(post, a & 0x80)
    post = np.asarray(augment.RANDAUGMENT_OPS["PosterizeIncreasing"](img, 1.0, rng, ctx))
    assert not post.any()  # 0 bits kept


# The geometric RandAugment ops as PIL computes them (the reference).
_PIL_GEOMETRY = {
    "Rotate": lambda img, deg, ctx: img.rotate(deg, resample=ctx.interpolation, fillcolor=ctx.fill),
    "ShearX": lambda img, v, ctx: img.transform(
        img.size, Image.Transform.AFFINE, (1, v, 0, 0, 1, 0), ctx.interpolation, fillcolor=ctx.fill
    ),
    "ShearY": lambda img, v, ctx: img.transform(
        img.size, Image.Transform.AFFINE, (1, 0, 0, v, 1, 0), ctx.interpolation, fillcolor=ctx.fill
    ),
    "TranslateXRel": lambda img, v, ctx: img.transform(
        img.size, Image.Transform.AFFINE, (1, 0, v, 0, 1, 0), ctx.interpolation, fillcolor=ctx.fill
    ),
    "TranslateYRel": lambda img, v, ctx: img.transform(
        img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, v), ctx.interpolation, fillcolor=ctx.fill
    ),
}


class _FixedSign:
    """An rng stand-in for `_negate` only: ``random()`` picks the sign of the op's argument."""

    def __init__(self, negative: bool):
        self._value = 1.0 if negative else 0.0

    def random(self):
        return self._value


@pytest.mark.parametrize("name", sorted(_PIL_GEOMETRY))
@pytest.mark.parametrize("negative", [False, True])
def test_geometric_ops_equal_pil_inside_the_image_and_fill_outside(name, negative):
    """OpenCV's warps against PIL's on an exactly linear image, f = 4x + 3y (per channel).

    Both bicubic kernels (a = -0.5 in PIL, -0.75 in OpenCV) reproduce linear
    functions, so where all 4 x 4 taps lie inside the image both compute
    f(src) exactly up to OpenCV's 1/32 pixel position grid (at most
    (4 + 3) / 64 = 0.11 grey levels) and each rounds to uint8: they differ by
    at most 1. A half-pixel error in the rotation's map moves the image by
    up to 3.5 grey levels, a wrong sign or centre by far more. Where all taps lie outside, both are
    exactly the fill colour; the 2-pixel band between is where they differ by design.
    """
    x, y = np.meshgrid(np.arange(32), np.arange(32))
    f = (4 * x + 3 * y).astype(np.uint8)  # at most 4 * 31 + 3 * 31 = 217
    img = Image.fromarray(np.stack([f, 255 - f, f // 2], -1))
    ctx = augment.OpContext(fill=(124, 116, 104), interpolation=Image.BICUBIC)
    level = 0.7
    out = augment.RANDAUGMENT_OPS[name](img, level, _FixedSign(negative), ctx)
    sign = -1.0 if negative else 1.0
    arg = {"Rotate": 30.0 * level, "ShearX": 0.3 * level, "ShearY": 0.3 * level}.get(name)
    arg = sign * (arg if arg is not None else 0.45 * level * 32)
    ref = _PIL_GEOMETRY[name](img, arg, ctx)
    # Where each output pixel samples the input (pixel indices, PIL's map).
    data = (
        augment.rotation(img.size, arg)
        if name == "Rotate"
        else {
            "ShearX": (1, arg, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, arg),
        }[name]
    )
    a, b, c, d, e, g = data
    src_x = a * (x + 0.5) + b * (y + 0.5) + c - 0.5
    src_y = d * (x + 0.5) + e * (y + 0.5) + g - 0.5
    inside = (src_x >= 1) & (src_x < 32 - 3) & (src_y >= 1) & (src_y < 32 - 3)
    outside = (src_x < -3) | (src_x > 32 + 2) | (src_y < -3) | (src_y > 32 + 2)
    assert inside.sum() > 100
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(ref, np.int16))
    assert diff[inside].max() <= 1
    assert outside.sum() > 0
    np.testing.assert_array_equal(np.asarray(out)[outside], np.asarray(ref)[outside])


def test_randaugment_is_deterministic_given_the_rng():
    ra = augment.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    img = _photo(96, 96)
    a = ra(img, np.random.default_rng(42))
    b = ra(img, np.random.default_rng(42))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = sum(not np.array_equal(np.asarray(ra(img, np.random.default_rng(s))), np.asarray(img)) for s in range(20))
    assert changed >= 12  # P(no op applied) = 0.25
    # Every op at every magnitude, RGB and L, never raises.
    small = _photo(32, 32)
    for spec in ("rand-m9-mstd0.5-inc1", "rand-m10-n4-mstd1-p1", "rand-m0-n4-p1"):
        ra = augment.RandAugment.from_string(spec)
        for s in range(150):
            for im in (small, small.convert("L")):
                assert ra(im, np.random.default_rng(s)).size == (32, 32)


def test_train_index_epochs_are_permutations():
    n = 10
    for p_count, repeats in ((1, 1), (2, 1), (3, 1), (2, 3)):
        n_local = n // p_count
        for epoch in range(3):
            got = []
            for p in range(p_count):
                got += [
                    indexing.train_index(
                        epoch * n_local + j,
                        num_examples=n,
                        seed=3,
                        process_index=p,
                        process_count=p_count,
                        repeats=repeats,
                    )
                    for j in range(n_local)
                ]
            if repeats == 1:
                assert len(set(got)) == len(got) == p_count * n_local
            # Image of global position g is perm[g // repeats].
            want = np.bincount([g // repeats for g in range(p_count * n_local)])
            have = np.bincount(got, minlength=n)
            assert sorted(have[have > 0]) == sorted(want[want > 0])
    a = [indexing.train_index(k, num_examples=n, seed=3, process_index=0, process_count=1) for k in range(2 * n)]
    assert a[:n] != a[n:] and sorted(a[:n]) == sorted(a[n:]) == list(range(n))
