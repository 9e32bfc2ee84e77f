"""Export a trained binary ViT as a truly 1-bit ``.bvit`` file, and load it for packed inference.

A trained checkpoint holds float *latent* weights; the model only ever uses
their signs (and ``alpha = mean|W|`` per output channel). Export keeps exactly
what inference needs:

* every binary block linear ``P`` (q, k, v, proj, fc1, fc2):
  ``P/kernel_bits`` (the signs, 1 bit each, ``uint32`` words packed along the
  input axis: ``(ceil(in/32), out)``), ``P/alpha`` (``mean|W|`` over the input
  axis, float32, precomputed; ones without ``weight_scale``) and ``P/bias``;
  with ``options.branch_norm = 'affine'`` or ``'batchnorm'`` (a normalisation
  of the shortcut branch that is a per-channel map ``y * scale + shift`` at
  inference; a BatchNorm's from its running statistics,
  :func:`bvit_jax.nn.folding.branch_norm_affine`) that map is folded into them:
  ``P/alpha = alpha * scale``, ``P/bias = b * scale + shift``
  (:func:`bvit_jax.nn.folding.fold_branch_affine`), and the ``norm`` is not stored;
* every other parameter (patch embedding, class token, position embedding,
  LayerNorms, shifts ``beta``/``gamma``, RPReLU, attention levels (their raw parameter
  ``attn_level_raw``, ``c = c_min + softplus(raw)``),
  head) unchanged in float32.

Bits: the file's bit convention (:data:`bvit_jax.deploy.bvit_format.BIT_CONVENTION`,
the standard order of :mod:`bvit_jax.deploy.bitops`); the container, its header and
its checks (magic, version, sizes, CRC-32): :mod:`bvit_jax.deploy.bvit_format`. This
module knows which tensors a model of a given architecture and options
stores (and checks a file against them on loading).

Python API::

    blob = export_model(model, "model.bvit", data=config.data, variant="deit_small", preset="binaryvit")
    packed = load_packed("model.bvit")  # a bvit_jax.deploy.packed.PackedModel
    logits = bvit_jax.deploy.packed.packed_forward(packed, images)

Command line (a trainer workdir's best checkpoint -> file)::

    python -m bvit_jax.deploy.export --workdir=/tmp/run --out=model.bvit [--which=best|latest] [--labels=names.txt]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bvit_jax import cli
from bvit_jax import data as data_lib
from bvit_jax.deploy import bvit_format
from bvit_jax.deploy.bitops import to_planes
from bvit_jax.deploy.bvit_format import PackedFormatError
from bvit_jax.deploy.kernel_formats import kernel_format
from bvit_jax.deploy.latency import packed_vs_fp32
from bvit_jax.deploy.packed import PackedModel, check_packable, resolve_backend
from bvit_jax.errors import UserError
from bvit_jax.nn import binarize
from bvit_jax.nn.folding import branch_norm_affine, fold_branch_affine
from bvit_jax.nn.models import VisionTransformer, ViTConfig, abstract_model, model_variables
from bvit_jax.nn.options import BinaryOptions
from bvit_jax.nn.param_groups import flatten_with_paths, latent_weight_binarizers
from bvit_jax.nn.summary import size_accounting

__all__ = [
    "export_model",
    "export_params",
    "pack_model",
    "load_packed",
    "LATER_OPTIONS",
    "resolve_data",
    "export_workdir",
    "main",
]

_REQUIRED = object()  # "data" not passed (distinct from an explicit data=None)


def resolve_data(data, cfg: ViTConfig | None = None) -> tuple[dict[str, Any] | None, list[str] | None]:
    """The ``(preprocess, class_names)`` a ``.bvit`` header stores for ``data``.

    Like timm's ``pretrained_cfg``, the file carries the data settings the
    model was trained with, and they come from the data config itself, never
    from a guess: ``preprocess = bvit_jax.data.eval_settings(config).to_dict()``
    (``image_size``, ``channels``, ``interpolation``, ``eval_crop``,
    ``crop_ratio``, ``eval_jpeg_draft``, per-channel ``mean`` and ``std``:
    exactly what the trainer's eval pipeline applies) and
    ``class_names = bvit_jax.data.class_names(config)``. ``data`` is one of

    * a data config: a trainer's ``config.data`` (ConfigDict) or the ``data``
      entry of a workdir's ``config.json`` (dict), e.g.
      ``bvit_jax.runs.workdir.load_config(workdir)["data"]``;
    * a data set name: that data set's own defaults,
      ``bvit_jax.data.default_data_config(name)`` (``"fashion_mnist"``: 28 px,
      1 channel, mean 0.286, std 0.353). Right only if training used them;
    * a :class:`bvit_jax.data.EvalSettings`, or a header's ``preprocess``
      dict (no class names then);
    * ``None``: nothing is stored; :func:`bvit_jax.deploy.packed.packed_forward` runs the file on
      tensors you preprocess yourself, and ``python -m bvit_jax.deploy.predict``
      refuses it.

    Raises ``ValueError`` when the settings' ``image_size`` / ``channels``
    differ from the model's ``cfg`` (when given). Class names are dropped
    (``None``) when their number is not ``cfg.num_classes``.
    """
    if data is None:
        return None, None
    if isinstance(data, str):
        data = data_lib.default_data_config(data)
    settings = data_lib.eval_settings(data)
    names = None if isinstance(data, data_lib.EvalSettings) else data_lib.class_names(data)
    if cfg is not None:
        if (settings.size, settings.channels) != (cfg.image_size, cfg.in_channels):
            raise ValueError(
                f"the data config gives {settings.size} px, {settings.channels} channel(s) but the model takes "
                f"{cfg.image_size} px, {cfg.in_channels} channel(s): pass the data config the model was trained with"
            )
        if names is not None and len(names) != cfg.num_classes:
            names = None
    return settings.to_dict(), names


def _missing_data(fn: str) -> TypeError:
    return TypeError(
        f"{fn}() needs data=: the data config the model was trained with (a trainer's config.data, or "
        "bvit_jax.runs.workdir.load_config(workdir)['data']), or a data set name for that data set's defaults "
        "(data='fashion_mnist' means bvit_jax.data.default_data_config('fashion_mnist')), so that the file "
        "records the trainer's eval preprocessing; or data=None to record none (python -m bvit_jax.deploy.predict "
        "then refuses the file)"
    )


# --------------------------------------------------------------------------
# Packing a parameter dict.
# --------------------------------------------------------------------------


_log = logging.getLogger(__name__)

# Option fields added after format version 4 first appeared: written only when they differ from their
# default, so a file that does not use them stays readable by every version-4 reader (which refuses an option
# it does not know, as it should for a file that needs one).
LATER_OPTIONS = ("kernel_binarizer", "rprelu_everywhere", "attention_bypass")


def _options_to_json(opts: BinaryOptions) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    d.pop("dtype")
    defaults = BinaryOptions()
    for name in LATER_OPTIONS:
        if d[name] == getattr(defaults, name):
            d.pop(name)
    return d


def _options_from_json(d: Mapping[str, Any]) -> BinaryOptions:
    """The header's ``options``; a field it lacks (e.g. ``asm_mode`` in older files) takes its default.

    A binarizer name this process has not registered (a user's own, registered by their code at
    training time; :func:`bvit_jax.nn.binarize.register_activation_binarizer`,
    :func:`~bvit_jax.nn.binarize.register_kernel_binarizer`) is read as the built-in one with a
    warning: export only writes binarizers whose values the file's tensors store as the built-in ones
    do (sign bits, with ``alpha``), and the packed forward needs their forward only, not their gradient.
    """
    known = {f.name for f in dataclasses.fields(BinaryOptions)} - {"dtype"}
    unknown = set(d) - known
    if unknown:
        raise PackedFormatError(f"unknown model options in header: {sorted(unknown)}")
    d = dict(d)
    defaults = BinaryOptions()
    for name, registry in (
        ("act_binarizer", binarize.ACTIVATION_BINARIZERS),
        ("kernel_binarizer", binarize.KERNEL_BINARIZERS),
    ):
        if name in d and d[name] not in registry:
            _log.warning(
                "the file's %s %r is not registered in this process: loading it as %r, whose forward "
                "(+-1 signs) the file stores",
                name,
                d[name],
                getattr(defaults, name),
            )
            d[name] = getattr(defaults, name)
    return BinaryOptions(**d, dtype=jnp.float32)


def _expected_params(cfg: ViTConfig, opts: BinaryOptions) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """``{path: shape}`` of the model's parameters and ``{path: binarizer}`` of its latent binary kernels.

    Every binarizer's packing has a stored form (:func:`bvit_jax.deploy.kernel_formats.kernel_format`,
    ``ValueError`` otherwise).
    """
    model = abstract_model(cfg, opts)
    params = model_variables(model)  # parameters, and a BatchNorm's running statistics
    binary = latent_weight_binarizers(model)
    for path, binarizer in binary.items():
        if not path.endswith("/kernel"):  # the file packs (in, out) kernels; another binarized parameter needs a format
            raise ValueError(f"cannot export the binarized parameter {path!r}: the .bvit format packs kernels only")
        kernel_format(binarizer, path)
    return {p: tuple(v.shape) for p, v in flatten_with_paths(params)}, binary


def _folded_norm(opts: BinaryOptions, kernel_path: str) -> str | None:
    """The branch normalisation folded into the binary linear of ``kernel_path`` (its module path), or None.

    With ``linear_shortcut`` and a foldable ``branch_norm`` (``'affine'``,
    ``'batchnorm'``: a per-channel map at inference), the ``LinearBlock`` ``P`` of the kernel
    ``P/linear/kernel`` has its normalisation ``P/norm``, stored folded into
    ``P/linear/alpha`` and ``P/linear/bias``.
    """
    if not opts.linear_shortcut or opts.branch_norm == "layernorm":
        return None
    base = kernel_path[: -len("/kernel")]
    if not base.endswith("/linear"):
        raise ValueError(f"binary kernel {kernel_path!r} is not the linear of a LinearBlock")
    return base[: -len("/linear")] + "/norm"


def _expected_tensors(cfg: ViTConfig, opts: BinaryOptions) -> dict[str, tuple[str, tuple[int, ...], int | None]]:
    """``{name: (dtype, shape, bits)}`` a packed file of this architecture holds."""
    shapes, binary = _expected_params(cfg, opts)
    folded = {n for p in binary if (n := _folded_norm(opts, p)) is not None}
    out = {}
    for path, shape in shapes.items():
        if path.rsplit("/", 1)[0] in folded:
            continue
        if path in binary:
            base = path[: -len("/kernel")]
            for suffix, spec in kernel_format(binary[path]).tensors(*shape).items():
                out[f"{base}/{suffix}"] = spec
            if _folded_norm(opts, path) is not None:  # the folded bias, also for a linear without one
                out[base + "/bias"] = ("float32", shape[-1:], None)
        else:
            out[path] = ("float32", shape, None)
    return out


def _pack_flat(
    flat: Mapping[str, Any], cfg: ViTConfig, opts: BinaryOptions
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Float params ``{path: array}`` -> (file tensors ``{name: array}``, ``{kernel_bits name: in}``)."""
    check_packable(cfg, opts)
    shapes, binary = _expected_params(cfg, opts)
    missing = sorted(set(shapes) - set(flat))
    unexpected = sorted(set(flat) - set(shapes))
    wrong = sorted(p for p in set(shapes) & set(flat) if tuple(np.shape(flat[p])) != shapes[p])
    if missing or unexpected or wrong:
        raise ValueError(
            "parameters do not match the model architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {[(p, np.shape(flat[p]), shapes[p]) for p in wrong[:5]]}"
        )
    tensors: dict[str, np.ndarray] = {}
    bits: dict[str, int] = {}
    folded = {}  # norm path -> the binary linear it folds into
    for path in binary:
        if (norm := _folded_norm(opts, path)) is not None:
            folded[norm] = path[: -len("/kernel")]

    def f32(path):
        return np.asarray(jax.device_get(flat[path]), dtype=np.float32)

    for path in sorted(shapes):
        if path.rsplit("/", 1)[0] in folded:
            continue  # stored folded into its linear's alpha and bias
        value = f32(path)
        if path in binary:
            base = path[: -len("/kernel")]
            fmt = kernel_format(binary[path], path)  # the stored form of the binarizer's packing
            tensors.update({f"{base}/{k}": v for k, v in fmt.pack(value, binary[path]).items()})
            for suffix, (_, _, n_bits) in fmt.tensors(*value.shape).items():
                if n_bits is not None:
                    bits[f"{base}/{suffix}"] = n_bits
        else:
            tensors[path] = value
    for norm, base in folded.items():
        # The normalisation as its inference map y * scale + shift (a BatchNorm: from its running
        # statistics), then alpha' = alpha * scale, b' = b * scale + shift: by the functions the
        # model's eval forward uses (bvit_jax.nn.folding.branch_norm_affine, fold_branch_affine, which
        # round every product before its add), so the same values.
        names = [p.rsplit("/", 1)[1] for p in shapes if p.rsplit("/", 1)[0] == norm]
        scale, shift = branch_norm_affine(opts.branch_norm, {n: jnp.asarray(f32(f"{norm}/{n}")) for n in names})
        b = tensors.get(base + "/bias")  # None before a BatchNorm (no bias)
        alpha, bias = fold_branch_affine(
            jnp.asarray(tensors[base + "/alpha"]), None if b is None else jnp.asarray(b), scale, shift
        )
        tensors[base + "/alpha"] = np.asarray(alpha, dtype=np.float32)
        tensors[base + "/bias"] = np.asarray(bias, dtype=np.float32)
    return tensors, bits


def _model_flat_params(model: VisionTransformer) -> dict[str, Any]:
    return dict(flatten_with_paths(model_variables(model)))


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def export_params(
    params: Mapping[str, Any],
    cfg: ViTConfig,
    opts: BinaryOptions,
    path: str | os.PathLike | None = None,
    *,
    data: Any = _REQUIRED,
    variant: str | None = None,
    preset: str | None = None,
    class_names: list[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """Pack a float parameter dict (nested pure dict or flat ``{"a/b": array}``) into a ``.bvit`` file.

    ``data`` (required): the training data config, a data set name, or
    ``None``; see :func:`resolve_data`, which gives the header's
    ``preprocess`` and default ``class_names`` (``class_names`` given here
    take precedence). Returns the file's bytes; also writes them to ``path``
    when given. Raises ``ValueError`` if the parameters do not fit
    ``cfg``/``opts``, the model has no binary linears (see
    :func:`bvit_jax.deploy.packed.check_packable`) or ``data`` does not fit the
    model, ``TypeError`` without ``data``.
    """
    if data is _REQUIRED:
        raise _missing_data("export_params")
    flat = dict(flatten_with_paths(params))  # "a/b/c" keys; a flat dict's keys pass through unchanged
    tensors, bits = _pack_flat(flat, cfg, opts)
    preprocess, data_names = resolve_data(data, cfg)
    if class_names is None:
        class_names = data_names
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {cfg.num_classes} classes")
    header = {
        "format": bvit_format.FORMAT_NAME,
        "version": bvit_format.FORMAT_VERSION,
        "variant": variant,
        "preset": preset,
        "config": dataclasses.asdict(cfg),
        "options": _options_to_json(opts),
        "trained_dtype": _dtype_name(opts.dtype),
        "bits": bvit_format.BIT_CONVENTION,
        "preprocess": preprocess,
        "class_names": list(class_names) if class_names is not None else None,
        "meta": dict(meta or {}),
    }
    blob = bvit_format.serialize(header, tensors, bits)
    if path is not None:
        bvit_format.write(blob, path)
    return blob


def export_model(
    model: VisionTransformer,
    path: str | os.PathLike | None = None,
    *,
    data: Any = _REQUIRED,
    variant: str | None = None,
    preset: str | None = None,
    class_names: list[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """Export a binary :class:`~bvit_jax.nn.models.VisionTransformer` to the 1-bit ``.bvit`` format.

    Returns the file's bytes and writes them to ``path`` when given.

    ``data`` is required: the data config the model was trained with (a
    trainer's ``config.data``, a workdir's ``config.json`` ``data`` dict), a
    data set name meaning that data set's defaults
    (:func:`bvit_jax.data.default_data_config`), or ``None`` (no
    preprocessing stored; ``predict`` refuses the file). There is no default,
    because any guessed normalisation (0.5, ImageNet statistics) silently
    differs from what most small data sets train with; see
    :func:`resolve_data`. The header then holds the trainer's exact eval
    transform (``preprocess``) and the data set's class names unless
    ``class_names`` is given. ``variant``/``preset`` are recorded for humans
    (the file itself holds the full architecture and options).
    """
    if data is _REQUIRED:
        raise _missing_data("export_model")
    return export_params(
        _model_flat_params(model),
        model.cfg,
        model.opts,
        path,
        data=data,
        variant=variant,
        preset=preset,
        class_names=class_names,
        meta=meta,
    )


def _runtime(tensors: Mapping[str, np.ndarray], bits: Mapping[str, int]) -> dict[str, jax.Array]:
    """File tensors -> device arrays for :func:`bvit_jax.deploy.packed.packed_forward` (kernels in plane order)."""
    out = {}
    for name, arr in tensors.items():
        if name in bits:
            arr = to_planes(arr, bits[name], axis=0)
        out[name] = jnp.asarray(arr)
    return out


def pack_model(model: VisionTransformer, *, data: Any = None, class_names: list[str] | None = None) -> PackedModel:
    """The :class:`~bvit_jax.deploy.packed.PackedModel` of a model, in memory (no file).

    For :func:`bvit_jax.deploy.packed.packed_forward` on tensors no ``data`` is needed. To classify
    image files with it (:func:`bvit_jax.deploy.predict.classify`), pass the training
    data config or a data set name as ``data``; the header then gets the same
    ``preprocess`` and ``class_names`` as :func:`export_model` would store
    (:func:`resolve_data`). With ``data=None`` the header has
    ``preprocess: None`` and ``classify`` refuses the model rather than guess.
    """
    tensors, bits = _pack_flat(_model_flat_params(model), model.cfg, model.opts)
    opts = dataclasses.replace(model.opts, dtype=jnp.float32)
    preprocess, data_names = resolve_data(data, model.cfg)
    names = list(class_names) if class_names is not None else data_names
    if names is not None and len(names) != model.cfg.num_classes:
        raise ValueError(f"{len(names)} class names for a model with {model.cfg.num_classes} classes")
    header = {
        "config": dataclasses.asdict(model.cfg),
        "options": _options_to_json(opts),
        "preprocess": preprocess,
        "class_names": names,
    }
    return PackedModel(model.cfg, opts, _runtime(tensors, bits), header)


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def load_packed(source) -> PackedModel:
    """Read a ``.bvit`` file (path, bytes or binary file object) into a :class:`~bvit_jax.deploy.packed.PackedModel`.

    Checks the magic, version, sizes and CRC-32
    (:func:`bvit_jax.deploy.bvit_format.read_file`) and that the tensors are exactly
    those of the recorded architecture; raises
    :class:`~bvit_jax.deploy.bvit_format.PackedFormatError` with the reason otherwise
    (e.g. ``truncated .bvit file: expected N bytes, the file has M``).
    """
    blob, where = bvit_format.read_bytes(source)
    header, tensors, bits = bvit_format.read_file(blob, where=where)
    try:
        cfg = ViTConfig(**header["config"])
        opts = _options_from_json(header["options"])
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFormatError(f"{where}: corrupt .bvit header ({type(e).__name__}: {e})") from None

    try:  # a model the packed forward cannot run is refused when loaded, with the reason
        check_packable(cfg, opts)
    except ValueError as e:
        raise PackedFormatError(f"{where}: {e}") from None
    expected = _expected_tensors(cfg, opts)
    for entry in header["tensors"]:
        name, dt, shape = entry["name"], entry["dtype"], tuple(entry["shape"])
        if name not in expected:
            raise PackedFormatError(f"{where}: unexpected tensor {name!r} for this architecture")
        want_dt, want_shape, want_bits = expected[name]
        if (dt, shape, entry.get("bits")) != (want_dt, want_shape, want_bits):
            raise PackedFormatError(
                f"{where}: tensor {name!r} is {dt}{list(shape)} (bits={entry.get('bits')}), "
                f"the architecture needs {want_dt}{list(want_shape)} (bits={want_bits})"
            )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PackedFormatError(f"{where}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return PackedModel(cfg, opts, _runtime(tensors, bits), header)


# --------------------------------------------------------------------------
# Workdir export (command line).
# --------------------------------------------------------------------------


def export_workdir(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    which: str = "best",
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Export a trainer workdir's checkpoint (``which``: ``best`` or ``latest``) to ``out``.

    Reads ``(config, model, params)`` through :func:`bvit_jax.runs.workdir.restore`
    (the model of ``config.json``: ``config.model.{variant, preset,
    num_classes, overrides}`` and ``config.data.{image_size, channels}``),
    and stores the eval preprocessing and class names of ``config.data``
    (:func:`resolve_data`; ``class_names`` given here replace the data set's).
    Returns a summary (path, bytes, accounting).
    """
    from bvit_jax.runs import storage
    from bvit_jax.runs.workdir import restore  # the run folder's owner (orbax), needed by workdir export only

    config, model, params = restore(os.fspath(workdir), which=which, dtype=jnp.float32)
    cfg, opts = model.cfg, model.opts
    meta = {"workdir": os.fspath(storage.absolute(workdir)), "checkpoint": str(which)}
    blob = export_params(
        jax.device_get(params),
        cfg,
        opts,
        out,
        data=config["data"],
        variant=config["model"]["variant"],
        preset=config["model"]["preset"],
        class_names=class_names,
        meta=meta,
    )
    acc = size_accounting(model)
    return {"out": os.fspath(out), "bytes": len(blob), **acc}


def _fmt_mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def _define_flags(fv, argv: list[str]) -> None:
    del argv
    from absl import flags

    flags.DEFINE_string("workdir", None, "Trainer workdir (holds config.json and checkpoints/).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output file, e.g. model.bvit.", flag_values=fv)
    flags.DEFINE_enum(
        "which",
        "best",
        ["best", "latest"],
        "best: the best eval checkpoint (else the latest); latest: the latest train state.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "labels", None, "Text file with one class name per line (default: the data set's names).", flag_values=fv
    )
    flags.DEFINE_bool(
        "latency",
        False,
        "Also time the exported model's packed forward against the fp32 forward of the same architecture "
        "(batch 1, side by side, on this machine).",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def _run(fv, args: list[str]) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; bvit-export takes only flags")
    names = None
    if fv["labels"].value:
        if not os.path.isfile(fv["labels"].value):
            raise UserError(f"--labels={fv['labels'].value}: no such file (one class name per line)")
        with open(fv["labels"].value, encoding="utf-8") as f:
            names = [line.rstrip("\n") for line in f if line.strip()]
    s = export_workdir(fv["workdir"].value, fv["out"].value, which=fv["which"].value, class_names=names)
    n = s["bytes"]
    print(f"wrote {s['out']}: {n} bytes ({_fmt_mb(n)})")
    print(f"  model parameters in fp32:           {_fmt_mb(s['fp32_bytes'])} ({s['fp32_bytes'] / n:.2f}x the file)")
    print(
        f"  fp model of this architecture:      {_fmt_mb(s['fp_model_bytes'])} "
        f"({s['fp_model_bytes'] / n:.2f}x the file)"
    )
    for key, label in (("full", "full count"), ("fp_arch", "fp-arch convention"), ("paper", "paper convention")):
        b = s[key + "_bytes"]
        print(f"  accounting, {label + ':':23s} {_fmt_mb(b)} (file / accounting {n / b:.3f})")
    if fv["latency"].value:
        isa = resolve_backend("auto")
        t = packed_vs_fp32(load_packed(s["out"]))
        print(
            f"  batch-1 latency on this {jax.default_backend().upper()}: packed forward "
            f"({'native ' + isa if isa else 'XLA ops'}) {t['packed_ms']:.2f} ms, fp32 forward of this architecture "
            f"{t['fp32_ms']:.2f} ms: speed-up {t['speedup']:.1f}x"
        )
    return 0


main = cli.command(
    "bvit-export", "Export a trainer workdir's checkpoint as a 1-bit packed .bvit model file.", _define_flags, _run
)


if __name__ == "__main__":
    sys.exit(main())
