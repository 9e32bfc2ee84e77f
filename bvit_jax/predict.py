"""Classify image files with an exported 1-bit model (``.bvit``, see :mod:`bvit_jax.export`).

Command line::

    python -m bvit_jax.predict --model=model.bvit img1.jpg img2.png ... [--top_k=5] [--batch_size=16] [--json]

prints, per image, the ``top_k`` classes with their softmax probabilities
(class names when the file has them, else class indices). Inference is
:func:`bvit_jax.packed.packed_forward` (XNOR-popcount, float32 elsewhere).

Preprocessing is the eval transform stored in the file's header
(``preprocess``; :func:`bvit_jax.export.default_preprocess` or the trainer's
``config.data``): decode with PIL, convert to RGB (3 channels) or luma (1),
then ``center_crop`` (resize the shorter side to ``round(image_size /
crop_ratio)``, take the central ``image_size`` square) or ``resize`` (to
``image_size`` x ``image_size``) with the stored interpolation, and finally
``x = (pixel / 255 - mean) / std`` per channel.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bvit_jax.export import PackedFormatError, load_packed
from bvit_jax.packed import PackedModel, packed_forward

__all__ = ["preprocess_image", "load_images", "classify", "main"]

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def preprocess_image(img: Image.Image, pre: Mapping[str, Any]) -> np.ndarray:
    """One PIL image -> ``(image_size, image_size, channels)`` float32, per the header's ``preprocess``."""
    size, channels = int(pre["image_size"]), int(pre["channels"])
    img = img.convert("RGB" if channels == 3 else "L")
    resample = _RESAMPLE[pre.get("interpolation", "bilinear")]
    if pre.get("eval_crop", "resize") == "center_crop":
        short = int(round(size / float(pre.get("crop_ratio", 0.875))))
        w, h = img.size
        if w <= h:
            nw, nh = short, max(short, int(round(h * short / w)))
        else:
            nw, nh = max(short, int(round(w * short / h))), short
        img = img.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif img.size != (size, size):
        img = img.resize((size, size), resample)
    x = np.asarray(img, dtype=np.float32).reshape(size, size, channels) / 255.0
    mean = np.asarray(pre["mean"], np.float32).reshape(-1)
    std = np.asarray(pre["std"], np.float32).reshape(-1)
    return (x - mean) / std


def load_images(paths: Sequence[str], pre: Mapping[str, Any]) -> tuple[np.ndarray, list[str | None]]:
    """Preprocess image files; returns ``(batch, errors)`` (an error message, or None, per path).

    Unreadable files give a zero image and their error, so one bad file does not stop the rest.
    """
    size, channels = int(pre["image_size"]), int(pre["channels"])
    out = np.zeros((len(paths), size, size, channels), np.float32)
    errors: list[str | None] = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                out[i] = preprocess_image(img, pre)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - report any decode failure per file
            errors.append(f"{type(e).__name__}: {e}")
    return out, errors


def classify(
    packed: PackedModel, paths: Sequence[str], *, top_k: int = 5, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Top-``k`` predictions for image files: ``[{"path", "top": [{"class", "name", "prob"}], "error"}]``.

    Batches are padded to ``batch_size`` so every batch reuses one compiled forward.
    """
    pre = packed.header.get("preprocess")
    if not pre:
        raise ValueError("the model file has no 'preprocess' entry in its header")
    names = packed.header.get("class_names")
    k = max(1, min(top_k, packed.cfg.num_classes))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        x, errors = load_images(chunk, pre)
        n = len(chunk)
        if n < batch_size and len(paths) > batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        probs = np.asarray(jax.nn.softmax(packed_forward(packed, jnp.asarray(x)), axis=-1))[:n]
        for path, p, err in zip(chunk, probs, errors):
            if err is not None:
                results.append({"path": path, "top": [], "error": err})
                continue
            idx = np.argsort(-p)[:k]
            top = [{"class": int(i), "name": names[i] if names else None, "prob": float(p[i])} for i in idx]
            results.append({"path": path, "top": top, "error": None})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bvit_jax.predict", description="Classify images with an exported 1-bit .bvit model."
    )
    parser.add_argument("--model", required=True, help="a .bvit file from python -m bvit_jax.export")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    try:
        packed = load_packed(args.model)
    except (OSError, PackedFormatError) as e:
        print(f"error: cannot load {args.model}: {e}", file=sys.stderr)
        return 1
    failed = False
    for r in classify(packed, args.images, top_k=args.top_k, batch_size=args.batch_size):
        if args.json:
            print(json.dumps(r))
        elif r["error"]:
            print(f"{r['path']}: error: {r['error']}")
        else:
            preds = ", ".join(f"{t['name'] if t['name'] is not None else t['class']} ({t['prob']:.3f})" for t in r["top"])
            print(f"{r['path']}: {preds}")
        failed |= r["error"] is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
