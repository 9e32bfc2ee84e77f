"""Classify image files with an exported 1-bit model (``.bvit``, see :mod:`bvit_jax.deploy.export`).

Command line::

    bvit-predict --model=model.bvit img1.jpg img2.png ... [--top_k=5] [--batch_size=16] [--json]
    python -m bvit_jax.deploy.predict ...   (the same)

prints, per image, the ``top_k`` classes with their softmax probabilities:
class names when the file has them (``class_names`` in its header, stored at
export from :func:`bvit_jax.data.class_names`: Fashion-MNIST's names,
ImageNet's synset ids, ...), else class indices. Inference is
:func:`bvit_jax.deploy.packed.packed_forward` (XNOR-popcount, float32 elsewhere).

Preprocessing is the trainer's eval transform, :func:`bvit_jax.data.eval_preprocess`,
with the settings stored in the file's header (``preprocess``, written at
export from the training data config by
``bvit_jax.data.eval_settings(config.data).to_dict()``): the input tensor is
bit for bit what the eval pipeline gives for the same file. A file exported
with ``data=None`` has no ``preprocess`` and is refused.

Exit status: 0 when every image was classified; 1 when the model cannot be
loaded or used, or when any image could not be read (the others are still
classified and printed first; the errors go to stderr, or into the JSON
lines with ``--json``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bvit_jax import cli
from bvit_jax import data as data_lib
from bvit_jax.data.decode import DecodeError
from bvit_jax.deploy.bvit_format import PackedFormatError
from bvit_jax.deploy.export import load_packed
from bvit_jax.deploy.packed import PackedModel, packed_forward
from bvit_jax.errors import UserError

__all__ = ["model_settings", "load_images", "classify", "main"]


def model_settings(packed: PackedModel) -> data_lib.EvalSettings:
    """The eval transform stored in a packed model's header, checked against its architecture.

    Raises :class:`~bvit_jax.deploy.bvit_format.PackedFormatError` (a ``ValueError``) when
    the header has no ``preprocess`` (exported with ``data=None``) or its size /
    channels do not fit the model.
    """
    pre = packed.header.get("preprocess")
    if not pre:
        raise PackedFormatError(
            "the model file records no eval preprocessing (it was exported with data=None); re-export it with "
            "export_model(model, path, data=<the training data config>) or from the trainer's workdir"
        )
    settings = data_lib.eval_settings(pre)
    cfg = packed.cfg
    if (settings.size, settings.channels) != (cfg.image_size, cfg.in_channels):
        raise PackedFormatError(
            f"the file's preprocessing gives {settings.size} px x {settings.channels} channel(s), "
            f"the model takes {cfg.image_size} px x {cfg.in_channels}"
        )
    return settings


def load_images(paths: Sequence[str], settings: Any) -> tuple[np.ndarray, list[str | None]]:
    """Read and preprocess image files: ``(batch, errors)``, an error message (or None) per path.

    Each file's bytes go through :func:`bvit_jax.data.eval_preprocess` with
    ``settings`` (an :class:`~bvit_jax.data.EvalSettings`, a data config or a
    header's ``preprocess``), so ``batch[i]`` equals the eval pipeline's image
    for that file bit for bit. A file that cannot be opened or decoded gives a
    zero image and its error, so one bad file does not stop the rest.
    """
    s = data_lib.eval_settings(settings)
    out = np.zeros((len(paths), s.size, s.size, s.channels), np.float32)
    errors: list[str | None] = []
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                encoded = f.read()
            out[i] = data_lib.eval_preprocess(encoded, s)
            errors.append(None)
        except (OSError, DecodeError) as e:
            message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))  # PIL names the buffer
            errors.append(f"{type(e).__name__}: {message}")
    return out, errors


def classify(
    packed: PackedModel, paths: Sequence[str], *, top_k: int = 5, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Top-``k`` predictions for image files: ``[{"path", "top": [{"class", "name", "prob"}], "error"}]``.

    ``prob`` is the softmax of the packed model's logits; ``name`` the
    header's class name (None without names). Unreadable files get
    ``top == []`` and their ``error``. Batches are padded to ``batch_size``
    so every batch reuses one compiled forward.
    """
    settings = model_settings(packed)
    names = packed.header.get("class_names")
    if names is not None and len(names) != packed.cfg.num_classes:
        names = None
    k = max(1, min(top_k, packed.cfg.num_classes))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start : start + batch_size])
        x, errors = load_images(chunk, settings)
        n = len(chunk)
        if n < batch_size and len(paths) > batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        probs = np.asarray(jax.nn.softmax(packed_forward(packed, jnp.asarray(x)), axis=-1))[:n]
        for path, p, err in zip(chunk, probs, errors):
            if err is not None:
                results.append({"path": path, "top": [], "error": err})
                continue
            idx = np.argsort(-p, kind="stable")[:k]
            top = [{"class": int(i), "name": names[i] if names else None, "prob": float(p[i])} for i in idx]
            results.append({"path": path, "top": top, "error": None})
    return results


def _define_flags(fv, argv: list[str]) -> None:
    del argv
    from absl import flags

    flags.DEFINE_string("model", None, "A .bvit file written by bvit-export.", flag_values=fv)
    flags.DEFINE_integer("top_k", 5, "Classes printed per image.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "Images per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("json", False, "Print one JSON object per image.", flag_values=fv)
    flags.mark_flag_as_required("model", flag_values=fv)


def _run(fv, images: list[str]) -> int:
    if not images:
        raise UserError("no image files given: bvit-predict --model=model.bvit IMAGE [IMAGE ...]")
    model = fv["model"].value
    try:
        packed = load_packed(model)
    except OSError as e:
        raise UserError(f"cannot read the model file {model}: {e.strerror or e}") from None
    results = classify(packed, images, top_k=fv["top_k"].value, batch_size=fv["batch_size"].value)
    failed = 0
    for r in results:
        if fv["json"].value:
            print(json.dumps(r))
        elif r["error"]:
            print(f"{r['path']}: error: {r['error']}", file=sys.stderr)
        else:
            preds = ", ".join(
                f"{t['name'] if t['name'] is not None else t['class']} ({t['prob']:.3f})" for t in r["top"]
            )
            print(f"{r['path']}: {preds}")
        failed += r["error"] is not None
    if failed:
        print(f"error: {failed} of {len(results)} input(s) could not be read", file=sys.stderr)
        return 1
    return 0


main = cli.command(
    "bvit-predict",
    "Classify image files with an exported 1-bit .bvit model:\n\n"
    "    bvit-predict --model=model.bvit IMAGE [IMAGE ...] [--top_k=5] [--json]",
    _define_flags,
    _run,
)


if __name__ == "__main__":
    sys.exit(main())
