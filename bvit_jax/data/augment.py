"""Per-image geometry and colour augmentation on PIL images and numpy arrays.

All randomness comes from the ``np.random.Generator`` passed in (grain's
per-example generator), so every output is a pure function of (seed, index).

JPEG draft: `random_resized_crop` and `resize_center_crop` first compute the
source region in original pixel coordinates from the header size, then ask
libjpeg to decode at 1/2, 1/4 or 1/8 scale (``Image.draft``) only when the
region still has at least the output size after that scaling; the final
resize is then a downscale from at least the output resolution. The DCT-domain
downscale is an area-averaging filter, so the result differs from a
full-resolution bicubic resize by a few grey levels, not in geometry (box
coordinates are scaled exactly). It never up-samples. Switch it off with
``config.jpeg_draft = False`` for bit-exact torchvision-style arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bvit_jax.data import decode as decode_lib

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resample(name: str) -> Image.Resampling:
    try:
        return RESAMPLE[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {list(RESAMPLE)}") from None


# OpenCV's filters for the same names, used by the affine warps of RandAugment.
CV2_INTERPOLATION = {
    Image.Resampling.NEAREST: cv2.INTER_NEAREST,
    Image.Resampling.BILINEAR: cv2.INTER_LINEAR,
    Image.Resampling.BICUBIC: cv2.INTER_CUBIC,
    Image.Resampling.LANCZOS: cv2.INTER_LANCZOS4,
}
# The pipeline parallelises over images (grain worker processes and reader
# threads); OpenCV's own threads inside one 224 px warp would only compete
# with them.
cv2.setNumThreads(1)


# ----------------------------------------------------------------------------
# Crops.
# ----------------------------------------------------------------------------


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Inception-style crop box ``(left, top, w, h)``.

    torchvision's ``RandomResizedCrop.get_params`` (Szegedy et al. 2015): up to
    10 tries of area ``A * U(scale)`` and aspect ``exp(U(log ratio))`` with
    ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))``,
    uniform position; otherwise the centred largest crop with aspect clamped
    to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _decode_box_resized(
    img: Image.Image, box: Sequence[float], size: int, channels: int, interpolation: str, use_draft: bool
) -> Image.Image:
    """Decodes `img` (lazily opened) and resizes region `box` to size x size."""
    x0, y0, x1, y1 = box
    factor = 1.0
    if use_draft and img.format == "JPEG":
        w, h = img.size
        factor = decode_lib.draft(img, channels, (w * size / (x1 - x0), h * size / (y1 - y0)))
    img = decode_lib.load(img, channels)
    box = (x0 * factor, y0 * factor, x1 * factor, y1 * factor)
    return img.resize((size, size), resample(interpolation), box=box)


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    *,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    channels: int = 3,
    interpolation: str = "bicubic",
    use_draft: bool = True,
) -> Image.Image:
    """Decode + RandomResizedCrop(size) of a lazily opened image (see module)."""
    left, top, w, h = random_resized_crop_box(img.size[0], img.size[1], rng, scale, ratio)
    return _decode_box_resized(img, (left, top, left + w, top + h), size, channels, interpolation, use_draft)


def center_crop_box(width: int, height: int, size: int, crop_ratio: float) -> tuple[float, float, float, float]:
    """Region of the original that ``Resize(R)`` + ``CenterCrop(size)`` keeps.

    ``R = floor(size / crop_ratio)`` (timm: 224 / 0.875 = 256). torchvision
    resizes the shorter side to ``R`` and the longer to ``int(R * long /
    short)``, then crops at ``round((R' - size) / 2)``. Resizing this box
    straight to ``size`` gives the same pixels: PIL's resampling with a box
    uses the same scale and sample positions as resize-then-crop.
    """
    r = int(math.floor(size / crop_ratio + 1e-6))
    if width <= height:
        new_w, new_h = r, int(r * height / width)
    else:
        new_w, new_h = int(r * width / height), r
    new_w, new_h = max(new_w, size), max(new_h, size)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def resize_center_crop(
    img: Image.Image,
    size: int,
    crop_ratio: float = 0.875,
    *,
    channels: int = 3,
    interpolation: str = "bicubic",
    use_draft: bool = True,
) -> Image.Image:
    """Eval transform: shorter side to ``size / crop_ratio``, centre crop."""
    box = center_crop_box(img.size[0], img.size[1], size, crop_ratio)
    return _decode_box_resized(img, box, size, channels, interpolation, use_draft)


def resize(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize to ``size x size`` (no-op if already that size)."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), resample(interpolation))


def pad_random_crop(x: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad `pad` pixels per side, crop back to the input size at random.

    The CIFAR / MNIST augmentation of He et al. 2016 (pad 4 at 32 px).
    """
    if pad <= 0:
        return x
    h, w = x.shape[:2]
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    top = int(rng.integers(0, 2 * pad + 1))
    left = int(rng.integers(0, 2 * pad + 1))
    return padded[top : top + h, left : left + w]


def random_hflip(x: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
    """Mirror ``[H, W, C]`` left-right with probability `prob`."""
    if prob > 0 and rng.random() < prob:
        return x[:, ::-1]
    return x


# ----------------------------------------------------------------------------
# RandAugment.
# ----------------------------------------------------------------------------

_LEVEL_DENOM = 10.0  # timm: magnitudes are given on a 0..10 scale.


def _negate(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


@dataclasses.dataclass(frozen=True)
class OpContext:
    """What every RandAugment op takes besides the image: the fill colour and the resampling filter."""

    fill: tuple | int
    interpolation: Image.Resampling


def affine(img: Image.Image, data: Sequence[float], ctx: OpContext) -> Image.Image:
    """``img.transform(img.size, AFFINE, data, ...)`` computed with OpenCV's ``warpAffine``.

    `data` = ``(a, b, c, d, e, f)`` is PIL's inverse map in continuous
    coordinates (pixel ``i`` covers ``[i, i + 1)``): the output point ``p``
    samples the input at ``A p + t``, ``A = [[a, b], [d, e]]``, ``t = (c, f)``.
    OpenCV puts pixel centres at integers, so the same map on pixel indices is
    ``src = A dst + (t + A (1/2, 1/2) - (1/2, 1/2))``, passed with
    ``WARP_INVERSE_MAP``. What differs from PIL, by design (2.6x less CPU per
    224 px bicubic warp, measured in docs/data.md): OpenCV's bicubic kernel has
    ``a = -0.75`` (PIL's ``-0.5``; both reproduce linear images exactly),
    sub-pixel positions are quantised to 1/32 pixel, and the 2 pixels along the
    edge of the warped image blend in the fill colour where PIL repeats the
    edge pixel. tests/test_data_augment.py bounds the difference.
    """
    a, b, c, d, e, f = (float(v) for v in data)
    shift_x = c + 0.5 * (a + b) - 0.5
    shift_y = f + 0.5 * (d + e) - 0.5
    matrix = np.array([[a, b, shift_x], [d, e, shift_y]], np.float64)
    src = np.asarray(img)
    fill = ctx.fill if isinstance(ctx.fill, tuple) else (ctx.fill,)
    out = cv2.warpAffine(
        src,
        matrix,
        img.size,
        flags=CV2_INTERPOLATION[ctx.interpolation] | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=tuple(float(v) for v in fill),
    )
    return Image.fromarray(out, img.mode)


def rotation(size: tuple[int, int], degrees: float) -> tuple[float, ...]:
    """PIL's ``Image.rotate(degrees)`` (counter-clockwise on screen, about the centre, same size) as affine `data`.

    The inverse map, with y pointing down: ``A = [[cos, -sin], [sin, cos]]``
    (angle in radians), ``t = centre - A centre``, ``centre = (w/2, h/2)``.
    """
    w, h = size
    rad = math.radians(degrees)
    cos, sin = math.cos(rad), math.sin(rad)
    cx, cy = w / 2.0, h / 2.0
    return (cos, -sin, cx - (cos * cx - sin * cy), sin, cos, cy - (sin * cx + cos * cy))


def _solarize_add(img, add):
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img, bits):
    """Keep the top `bits` bits of every value; 0 bits gives black (as
    ``ImageOps.posterize(img, 0)`` did before Pillow required bits >= 1)."""
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


# The RandAugment ops: name -> op(img, level, rng, ctx) -> img, with `level` = magnitude / 10 (0..1),
# `rng` the example's generator and `ctx` an OpContext.
# Level-to-argument maps are timm's `auto_augment.py` (RandAugment: Cubuk et
# al. 2020; "Increasing" variants make larger magnitude mean stronger).
RANDAUGMENT_OPS: dict[str, Callable] = {
    "AutoContrast": lambda img, l, r, c: ImageOps.autocontrast(img),
    "Equalize": lambda img, l, r, c: ImageOps.equalize(img),
    "Invert": lambda img, l, r, c: ImageOps.invert(img),
    # +-30 degrees at level 1.
    "Rotate": lambda img, l, r, c: affine(img, rotation(img.size, _negate(30.0 * l, r)), c),
    # Keep int(4 * level) bits (original), 4 - int(4 * level) (increasing).
    "Posterize": lambda img, l, r, c: _posterize(img, int(4 * l)),
    "PosterizeIncreasing": lambda img, l, r, c: _posterize(img, 4 - int(4 * l)),
    # Invert pixels >= threshold: int(256 * level) / 256 - int(256 * level).
    "Solarize": lambda img, l, r, c: ImageOps.solarize(img, int(256 * l)),
    "SolarizeIncreasing": lambda img, l, r, c: ImageOps.solarize(img, 256 - int(256 * l)),
    # Add int(110 * level) to pixels below 128.
    "SolarizeAdd": lambda img, l, r, c: _solarize_add(img, int(110 * l)),
    # Enhance factor 1.8 * level + 0.1 (original), max(0.1, 1 +- 0.9 * level).
    "Color": lambda img, l, r, c: ImageEnhance.Color(img).enhance(1.8 * l + 0.1),
    "Contrast": lambda img, l, r, c: ImageEnhance.Contrast(img).enhance(1.8 * l + 0.1),
    "Brightness": lambda img, l, r, c: ImageEnhance.Brightness(img).enhance(1.8 * l + 0.1),
    "Sharpness": lambda img, l, r, c: ImageEnhance.Sharpness(img).enhance(1.8 * l + 0.1),
    "ColorIncreasing": lambda img, l, r, c: ImageEnhance.Color(img).enhance(max(0.1, 1.0 + _negate(0.9 * l, r))),
    "ContrastIncreasing": lambda img, l, r, c: ImageEnhance.Contrast(img).enhance(max(0.1, 1.0 + _negate(0.9 * l, r))),
    "BrightnessIncreasing": lambda img, l, r, c: ImageEnhance.Brightness(img).enhance(
        max(0.1, 1.0 + _negate(0.9 * l, r))
    ),
    "SharpnessIncreasing": lambda img, l, r, c: ImageEnhance.Sharpness(img).enhance(
        max(0.1, 1.0 + _negate(0.9 * l, r))
    ),
    # Shear factor +-0.3 at level 1.
    "ShearX": lambda img, l, r, c: affine(img, (1, _negate(0.3 * l, r), 0, 0, 1, 0), c),
    "ShearY": lambda img, l, r, c: affine(img, (1, 0, 0, _negate(0.3 * l, r), 1, 0), c),
    # Translate by +-45 % of the side at level 1.
    "TranslateXRel": lambda img, l, r, c: affine(img, (1, 0, _negate(0.45 * l, r) * img.size[0], 0, 1, 0), c),
    "TranslateYRel": lambda img, l, r, c: affine(img, (1, 0, 0, 0, 1, _negate(0.45 * l, r) * img.size[1]), c),
}

RAND_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """RandAugment (Cubuk et al. 2020) with timm's policy strings.

    ``'rand-m9-mstd0.5-inc1'`` (DeiT's ``--aa``) means: ``n=2`` ops per image
    (default), drawn uniformly with replacement from 15 ops; magnitude ``m=9``
    on a 0..10 scale, re-drawn for every op application as
    ``clip(N(m, mstd=0.5), 0, mmax=10)``; ``inc1`` selects the "increasing"
    variants (stronger posterize / solarize / enhance at larger m); each chosen
    op is applied with probability ``p=0.5``. Geometric ops fill with the
    dataset mean colour and use `interpolation`. Keys: ``m``, ``n``, ``mstd``,
    ``mmax``, ``inc``, ``p``.
    """

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    magnitude_max: float = 10.0
    increasing: bool = True
    prob: float = 0.5
    fill: tuple = (124, 116, 104)
    interpolation: str = "bicubic"

    @classmethod
    def from_string(cls, spec: str, fill=(124, 116, 104), interpolation: str = "bicubic") -> RandAugment:
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand': {spec!r}")
        kw = dict(num_ops=2, magnitude=10.0, magnitude_std=0.0, magnitude_max=10.0, increasing=False, prob=0.5)
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)([0-9.]+|inf)", part)
            if not m:
                raise ValueError(f"bad RandAugment section {part!r} in {spec!r}")
            key, val = m.groups()
            if key == "m":
                kw["magnitude"] = float(val)
            elif key == "n":
                kw["num_ops"] = int(val)
            elif key == "mstd":
                kw["magnitude_std"] = float(val)
            elif key == "mmax":
                kw["magnitude_max"] = float(val)
            elif key == "inc":
                kw["increasing"] = bool(int(val))
            elif key == "p":
                kw["prob"] = float(val)
            else:
                raise ValueError(f"unknown RandAugment key {key!r} in {spec!r}")
        return cls(fill=tuple(fill), interpolation=interpolation, **kw)

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        m = self.magnitude
        if self.magnitude_std == float("inf"):
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        return float(np.clip(m, 0.0, self.magnitude_max))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        fill = self.fill if img.mode == "RGB" else int(round(np.mean(self.fill)))
        ctx = OpContext(fill=fill, interpolation=resample(self.interpolation))
        ops = self.ops
        for k in rng.integers(0, len(ops), size=self.num_ops):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level = self.sample_magnitude(rng) / _LEVEL_DENOM
            img = RANDAUGMENT_OPS[ops[k]](img, level, rng, ctx)
        return img
