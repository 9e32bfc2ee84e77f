"""Image decoding with PIL: any format PIL reads, to RGB or luma.

Bad data in scraped or old data sets (ImageNet has CMYK JPEGs, grayscale
JPEGs and a PNG named ``.JPEG``) is decoded correctly by PIL: the format is
detected from the bytes, not the name, and ``convert('RGB')`` handles CMYK
(including Adobe's inverted CMYK) and grayscale. Files PIL cannot decode
(corrupt or truncated) raise `DecodeError`; the pipeline then skips them and
counts them (see `counters.data_stats`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Errors PIL raises on bad input: UnidentifiedImageError (an OSError), OSError
# ("image file is truncated", "broken data stream"), SyntaxError (bad markers),
# ValueError / struct errors on nonsense headers, DecompressionBombError.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, IndexError, TypeError, EOFError, Image.DecompressionBombError)


class DecodeError(ValueError):
    """An image could not be decoded."""


def open_image(data) -> Image.Image:
    """Opens encoded bytes lazily (header only) or wraps a uint8 array.

    Arrays ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` become L / RGB images;
    a PIL image is returned as it is.
    The returned image is not decoded yet, so `load` can still apply a JPEG
    draft.
    """
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        if data.ndim == 3 and data.shape[-1] == 1:
            data = data[..., 0]
        return Image.fromarray(np.ascontiguousarray(data, dtype=np.uint8))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Possibly corrupt EXIF data"
            return Image.open(io.BytesIO(bytes(data)))
    except _PIL_ERRORS as e:
        raise DecodeError(f"cannot identify image: {e}") from e


def pil_mode(channels: int) -> str:
    if channels == 3:
        return "RGB"
    if channels == 1:
        return "L"
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def draft(img: Image.Image, channels: int, min_size: tuple[float, float]) -> float:
    """Requests JPEG DCT-domain downscaling that keeps the image >= `min_size`.

    libjpeg can decode at 1/2, 1/4 or 1/8 scale (``Image.draft``); PIL picks
    the largest factor ``s`` with ``W // s >= min_w`` and ``H // s >= min_h``.
    Returns the factor by which coordinates shrank (1.0 when nothing changed or
    the file is not a JPEG). Must be called before the image is loaded.
    """
    w, h = img.size
    want = (max(1, int(np.ceil(min_size[0]))), max(1, int(np.ceil(min_size[1]))))
    try:
        res = img.draft(pil_mode(channels), want)
    except _PIL_ERRORS as e:
        raise DecodeError(f"draft failed: {e}") from e
    if not res:
        return 1.0
    return res[1][2] / w


def load(img: Image.Image, channels: int) -> Image.Image:
    """Decodes `img` fully and converts it to RGB (channels=3) or L (1).

    Raises `DecodeError` for corrupt or truncated files.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            mode = pil_mode(channels)
            if img.mode != mode:
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    # Composite transparent images on black, as a renderer would not
                    # leave undefined colours under alpha = 0.
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                    img = Image.alpha_composite(background, img)
                img = img.convert(mode)
        return img
    except _PIL_ERRORS as e:
        raise DecodeError(f"cannot decode image: {e}") from e


def decode(data, channels: int = 3) -> Image.Image:
    """Full decode of bytes / array to an RGB or L PIL image."""
    return load(open_image(data), channels)


def to_array(img: Image.Image, channels: int) -> np.ndarray:
    """PIL image -> ``uint8 [H, W, channels]``."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] != channels:
        raise ValueError(f"expected {channels} channels, got {a.shape}")
    return a
