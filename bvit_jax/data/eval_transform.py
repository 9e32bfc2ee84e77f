"""The eval transform of one image: `eval_settings(config)` and `eval_preprocess(data, settings)`.

The one derivation of the eval transform (an `EvalSettings`), shared by the
eval iterator, by ``bvit_jax.deploy.predict`` (which applies
`eval_preprocess` to image files) and by the ``.bvit`` export header. The
eval iterator computes it in two stages: `eval_image` (decode + crop,
``uint8``) per example, the normalisation (`EvalSettings.normalize`,
`Normalize`) per batch, so its images equal `eval_preprocess` of each
record bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bvit_jax.data import augment
from bvit_jax.data import config as config_lib
from bvit_jax.data import decode as decode_lib


class Normalize:
    """``(x / 255 - mean) / std`` as one multiply-add in float32: ``Normalize(mean, std, channels)(images)``.

    Works on ``[..., W, C]`` viewed as rows of ``W * C`` values with the
    per-channel constants tiled along the row: numpy then runs long
    contiguous inner loops (about 5x faster than broadcasting over ``C``).
    """

    def __init__(self, mean, std, channels: int):
        mean = config_lib.channel_vector(mean, channels)
        std = config_lib.channel_vector(std, channels)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-mean / std).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        width, channels = images.shape[-2:]
        out = images.astype(np.float32)
        rows = out.reshape(-1, width * channels)
        rows *= np.tile(self.scale, width)
        rows += np.tile(self.offset, width)
        return out


_EVAL_CROPS = ("center_crop", "resize")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The eval transform of a data config, in one value (see `eval_settings`).

    Fields (data-config names in brackets where they differ): ``size``
    (``image_size``), ``channels`` (3: RGB, 1: luma), ``interpolation``,
    ``eval_crop`` (``'center_crop'`` | ``'resize'``), ``crop_ratio``,
    ``eval_jpeg_draft``, ``mean`` and ``std`` (one float per channel, in
    [0, 1] units). `to_dict` gives them under the data-config names; that
    dict is what a ``.bvit`` file stores as its ``preprocess`` header, and
    `eval_settings` reads it back.
    """

    size: int
    channels: int
    interpolation: str
    eval_crop: str
    crop_ratio: float
    eval_jpeg_draft: bool
    mean: tuple
    std: tuple

    def to_dict(self) -> dict:
        """JSON-ready dict under the data-config field names."""
        return {
            "image_size": self.size,
            "channels": self.channels,
            "interpolation": self.interpolation,
            "eval_crop": self.eval_crop,
            "crop_ratio": self.crop_ratio,
            "eval_jpeg_draft": self.eval_jpeg_draft,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """``uint8 [..., H, W, C]`` -> float32 ``(x / 255 - mean) / std``.

        Computed as ``x * (1 / (255 std)) + (-mean / std)`` with float32
        constants (`Normalize`); elementwise, so one image and a batch holding
        it give the same bits.
        """
        return Normalize(self.mean, self.std, self.channels)(images)


def _per_channel(value, channels: int, what: str) -> tuple:
    v = np.asarray(value, np.float64).reshape(-1)
    if v.size not in (1, channels):
        raise ValueError(f"{what} has {v.size} values for {channels} channels")
    return tuple(float(x) for x in np.broadcast_to(v, (channels,)))


def eval_settings(config) -> EvalSettings:
    """The `EvalSettings` of a data config: the one derivation of the eval
    transform, used by `create_eval_iterator`, by `eval_preprocess` and (as
    ``eval_settings(config.data).to_dict()``) by the ``.bvit`` export header.

    `config`: a data ConfigDict (``default_data_config(...)``, a trainer's
    ``config.data``), a plain dict with the same fields (a workdir's
    ``config.json`` ``data`` entry, or a ``.bvit`` header's ``preprocess``),
    or an `EvalSettings` (returned as is). Reads ``image_size``,
    ``channels``, ``interpolation``, ``eval_crop``, ``crop_ratio``,
    ``eval_jpeg_draft`` (default False), ``mean`` and ``std`` (one value or
    one per channel; stored per channel). Raises ``ValueError`` when a
    required field is missing or a value is not one the pipeline knows.
    """
    if isinstance(config, EvalSettings):
        return config
    missing = [
        k
        for k in ("image_size", "channels", "interpolation", "eval_crop", "mean", "std")
        if config_lib.field(config, k) is None
    ]
    if missing:
        raise ValueError(f"the data config has no {missing} (needed for the eval transform)")
    channels = int(config_lib.field(config, "channels"))
    decode_lib.pil_mode(channels)  # 1 or 3
    eval_crop = str(config_lib.field(config, "eval_crop"))
    if eval_crop not in _EVAL_CROPS:
        raise ValueError(f"unknown eval_crop {eval_crop!r} (one of {_EVAL_CROPS})")
    interpolation = str(config_lib.field(config, "interpolation"))
    augment.resample(interpolation)  # known name
    crop_ratio = float(config_lib.field(config, "crop_ratio", 0.875))
    if eval_crop == "center_crop" and not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return EvalSettings(
        size=int(config_lib.field(config, "image_size")),
        channels=channels,
        interpolation=interpolation,
        eval_crop=eval_crop,
        crop_ratio=crop_ratio,
        eval_jpeg_draft=bool(config_lib.field(config, "eval_jpeg_draft", False)),
        mean=_per_channel(config_lib.field(config, "mean"), channels, "mean"),
        std=_per_channel(config_lib.field(config, "std"), channels, "std"),
    )


def eval_image(data, s) -> np.ndarray:
    """Decode + eval geometry of one image -> ``uint8 [H, W, C]`` (no
    normalisation; `eval_preprocess` is the whole transform).

    `s` is an `EvalSettings` (or the pipeline's internal settings, which have
    the same eval fields). Raises `decode.DecodeError` if the image cannot be
    decoded.
    """
    img = decode_lib.open_image(data)
    if s.eval_crop == "center_crop":
        img = augment.resize_center_crop(
            img, s.size, s.crop_ratio, channels=s.channels, interpolation=s.interpolation, use_draft=s.eval_jpeg_draft
        )
    else:
        img = augment.resize(decode_lib.load(img, s.channels), s.size, s.interpolation)
    return decode_lib.to_array(img, s.channels)


def eval_preprocess(data, settings) -> np.ndarray:
    """The eval transform of one image -> float32 ``[size, size, channels]``.

    `data`: encoded image bytes (any format PIL reads), a ``uint8`` array
    ``[H, W]`` / ``[H, W, C]`` or a PIL image; `settings`: anything
    `eval_settings` takes (a data config, a ``.bvit`` ``preprocess`` header,
    an `EvalSettings`). Steps:

    1. decode with PIL (format from the bytes); to RGB (``channels=3``;
       grayscale replicated, CMYK converted) or luma L (``channels=1``, PIL's
       ``L = R * 299/1000 + G * 587/1000 + B * 114/1000``); images with alpha
       (RGBA, LA, PA, P with transparency) are first composited on opaque
       black, i.e. ``rgb * a / 255`` (rounded by PIL);
    2. ``eval_crop='center_crop'``: resize the shorter side to
       ``R = floor(size / crop_ratio)`` and the longer to
       ``int(R * long / short)``, crop ``size x size`` at
       ``round((side - size) / 2)`` (one PIL resize of the matching box of the
       original, `augment.center_crop_box`); ``'resize'``: resize to
       ``size x size`` (no-op at that size); with ``interpolation``, and with a
       JPEG DCT-domain downscale first only if ``eval_jpeg_draft``;
    3. ``x = (pixel / 255 - mean) / std`` per channel (`EvalSettings.normalize`).

    `create_eval_iterator` runs exactly this: steps 1-2 (`eval_image`) per
    example and step 3 per batch, so its batches equal ``eval_preprocess`` of
    each image bit for bit; ``python -m bvit_jax.deploy.predict`` calls this
    function with the settings stored in the model file. Raises
    `decode.DecodeError` for data PIL cannot decode.
    """
    s = eval_settings(settings)
    return s.normalize(eval_image(data, s))
