"""Import DeiT weights from timm / PyTorch state dicts into this project's ViTs.

Uses: a full-precision DeiT as the distillation teacher, and a binary
student whose latent weights start from the DeiT weights.

Python API::

    from bvit_jax.interop.timm import from_timm, load_state_dict_file, load_timm_state_dict

    sd = load_state_dict_file("deit_small_patch16_224.pth")       # or a torch model's .state_dict()
    teacher, report = from_timm("deit_small_patch16_224", sd)      # preset "fp"
    student, report = from_timm("deit_small_patch16_224", sd, preset="binaryvit")
    print(report)                                                  # what was copied, what was left at init
    report = load_timm_state_dict(model, sd)                       # into a model you built

Command line (writes a workdir that the trainer accepts as
``--config.distill.teacher_workdir``)::

    python -m bvit_jax.interop.timm --timm_model=deit_small_patch16_224 \\
        --checkpoint=deit_small_patch16_224.pth --workdir=workdirs/deit_small_timm

The workdir (:mod:`bvit_jax.runs.workdir`) holds ``config.json``
(``configs/imagenet_deit.py:<variant>,<preset>``, with ``model.num_classes``,
``model.overrides.depth``, ``data.image_size`` and ``data.channels`` set from
the checkpoint; another config with ``--config=FILE:ARG``), a ``best/``
checkpoint as the trainer writes it (step 0, ``eval_top1=0``: not evaluated
here; :func:`bvit_jax.runs.workdir.save_model`) and ``import_report.json``.

Layout mapping (timm key -> our path; ``W.T``: a torch ``Linear`` weight is
``(out, in)``, ours ``(in, out)``)::

    cls_token (1,1,D), pos_embed (1,N+1,D)        -> same names
    patch_embed.proj.weight (D,C,p,p)             -> patch_embed/kernel (p,p,C,D)   (HWIO)
    patch_embed.proj.bias                         -> patch_embed/bias
    blocks.i.norm{1,2}.{weight,bias}              -> blocks/i/norm{1,2}/{scale,bias}
    blocks.i.attn.qkv.weight (3D,D), bias (3D,)   -> rows [0,D) q, [D,2D) k, [2D,3D) v:
                                                     blocks/i/attn/{q,k,v}/linear/{kernel (W.T), bias}
    blocks.i.attn.proj.*                          -> blocks/i/attn/proj/linear/{kernel (W.T), bias}
    blocks.i.mlp.fc{1,2}.*                        -> blocks/i/mlp/fc{1,2}/linear/{kernel (W.T), bias}
    norm.{weight,bias}                            -> norm/{scale,bias}
    head.{weight,bias}                            -> head/{kernel (W.T), bias}

Every parameter of our model outside this list exists only in the binary
presets (activation shifts ``beta``/``gamma``, RPReLU, the LayerNorm on each
real-valued shortcut, the attention level ``c``); it is left at its
initialisation and named in the report. A state dict with keys we cannot
place (a distillation token, layer scale, ...) is refused rather than
partly imported: DeiT's distilled variants (``dist_token``, ``head_dist``)
need a second token and head this model does not have.

Checks: every tensor's shape must match the model (a different image size,
class count, width or depth is reported with the setting to change), and
every source tensor must be used. ``num_heads`` cannot be read from weights:
it comes from the variant name (DeiT-Ti 3, S 6, B 12 heads).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bvit_jax import cli
from bvit_jax.errors import MissingExtraError, UserError
from bvit_jax.nn.models import VisionTransformer, config_overrides, create, get_variant
from bvit_jax.nn.param_groups import path_str
from bvit_jax.train.recipes import imagenet_deit_config

__all__ = [
    "ImportReport",
    "UnsupportedCheckpointError",
    "parse_timm_name",
    "load_state_dict_file",
    "timm_to_flat",
    "load_timm_state_dict",
    "from_timm",
    "write_workdir",
    "main",
]

# A path of our model that a DeiT checkpoint provides (everything else is binary-only).
SHARED_PATH = re.compile(
    r"^(cls_token|pos_embed|patch_embed/(kernel|bias)|norm/(scale|bias)|head/(kernel|bias)"
    r"|blocks/\d+/norm[12]/(scale|bias)"
    r"|blocks/\d+/attn/(q|k|v|proj)/linear/(kernel|bias)"
    r"|blocks/\d+/mlp/fc[12]/linear/(kernel|bias))$"
)

_TIMM_NAME = re.compile(r"^(?:timm/)?deit_(tiny|small|base)(_distilled)?_patch(\d+)_(\d+)(?:\.[\w-]+)?$")
_DISTILL_KEYS = ("dist_token", "head_dist.weight", "head_dist.bias")


class UnsupportedCheckpointError(UserError, ValueError):
    """The checkpoint or its name does not fit a model of this library (an unknown timm name, a
    distillation token, a shape or depth that disagrees); the message says which and what to use."""


class CheckpointFileError(UserError, FileNotFoundError):
    """The state dict file to import does not exist."""


# ----------------------------------------------------------------------------- report
_KINDS = (  # (regex on our path, what it is) for the report
    (r"/shift/beta$", "activation shift beta (RSign)"),
    (r"/shift/gamma$", "ASM gamma"),
    (r"/(q|k|v|proj|fc1|fc2)/norm/(scale|bias)$", "shortcut LayerNorm"),
    (r"/(mlp/act|out_act|attn/context_act)/(gamma|zeta|slope)$", "RPReLU"),
    (r"/attn/context_norm/(scale|bias)$", "attention bypass LayerNorm"),
    (r"/attn_level(_raw)?$", "attention level c"),
    (r"^head/", "head (skip_head)"),
)


def _kind(path: str) -> str:
    for pattern, kind in _KINDS:
        if re.search(pattern, path):
            return kind
    return path


@dataclasses.dataclass
class ImportReport:
    """What :func:`load_timm_state_dict` did.

    Attributes:
      copied: our parameter path -> the source it came from (``"blocks.0.attn.qkv.weight[0:192].T"``).
      left_at_init: our parameter path -> its size, for the parameters left at
        their initialisation (binary-only ones, or the head with ``skip_head``).
    """

    copied: dict[str, str]
    left_at_init: dict[str, int]
    num_copied: int  # scalars copied

    @property
    def num_left(self) -> int:
        return sum(self.left_at_init.values())

    def left_by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (tensors, values)}`` of the parameters left at init."""
        out: dict[str, tuple[int, int]] = {}
        for p, n in self.left_at_init.items():
            t, v = out.get(_kind(p), (0, 0))
            out[_kind(p)] = (t + 1, v + n)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "copied": self.copied,
            "left_at_init": self.left_at_init,
            "num_copied": self.num_copied,
            "num_left": self.num_left,
        }

    def __str__(self) -> str:
        lines = [f"copied {len(self.copied)} tensors ({self.num_copied:,} values) from the DeiT state dict"]
        if self.left_at_init:
            lines.append(f"left at init {len(self.left_at_init)} tensors ({self.num_left:,} values):")
            lines += [f"  {k:<32} {t:>4} tensors {v:>10,} values" for k, (t, v) in sorted(self.left_by_kind().items())]
        else:
            lines.append("left at init: nothing (every parameter came from the state dict)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- names and files
def parse_timm_name(name: str) -> dict[str, Any]:
    """``"deit_small_patch16_224"`` -> ``{"variant": "deit_small", "patch_size": 16, "image_size": 224}``.

    Also accepts our variant names (``"deit_small"``). Distilled names raise
    :class:`UnsupportedCheckpointError`.
    """
    if name in ("deit_tiny", "deit_small", "deit_base"):
        return {"variant": name}
    m = _TIMM_NAME.match(name)
    if not m:
        raise UnsupportedCheckpointError(
            f"unsupported timm model {name!r}: expected deit_{{tiny,small,base}}_patch16_<resolution> "
            "(e.g. deit_small_patch16_224)"
        )
    size, distilled, patch, res = m.groups()
    if distilled:
        raise UnsupportedCheckpointError(
            f"{name} is a distilled DeiT: its checkpoint holds a distillation token and head "
            "('dist_token', 'head_dist.weight', 'head_dist.bias') and this model has no distillation "
            f"token. Use the non-distilled deit_{size}_patch{patch}_{res}."
        )
    return {"variant": f"deit_{size}", "patch_size": int(patch), "image_size": int(res)}


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _normalize(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwrap ``{"model": sd}`` / ``{"state_dict": sd}`` files, drop a ``module.`` prefix, to numpy."""
    sd = state_dict
    for wrapper in ("model", "state_dict", "model_state"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        out[k] = _to_numpy(v)
    return out


def load_state_dict_file(path: str | Path) -> dict[str, np.ndarray]:
    """A checkpoint file as ``{name: numpy array}``.

    ``.pth``/``.pt``/``.bin`` (PyTorch, read with ``torch.load(weights_only=True)``;
    DeiT's own files wrap the weights in ``{"model": ...}``), ``.safetensors``
    (the Hugging Face hub's timm format; needs the ``safetensors`` package, not
    torch) or ``.npz``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointFileError(f"checkpoint {path} not found: pass the timm/DeiT state dict file with --checkpoint")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if suffix == ".npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    try:
        import torch
    except ImportError as e:  # or convert the file to .safetensors / .npz elsewhere
        raise MissingExtraError(f"reading {path} (a PyTorch file)", "interop", e) from None
    return _normalize(torch.load(path, map_location="cpu", weights_only=True))


# ----------------------------------------------------------------------------- conversion
def _check_distillation(sd: Mapping[str, Any]) -> None:
    found = [k for k in sd if k in _DISTILL_KEYS or k.startswith("head_dist.")]
    if found:
        raise UnsupportedCheckpointError(
            f"this state dict is a distilled DeiT (it holds {sorted(found)}): keys 'dist_token' and "
            "'head_dist' belong to a distillation token and head that this model does not have. "
            "Import a non-distilled DeiT (deit_{tiny,small,base}_patch16_224)."
        )


def _linear(flat: dict, src: dict, ours: str, key: str, w: np.ndarray, b: np.ndarray | None, rows: slice | None = None):
    """Torch ``Linear`` ``(out, in)`` weight (optionally a row block of it) -> our ``(in, out)`` kernel + bias."""
    sel = "" if rows is None else f"[{rows.start}:{rows.stop}]"
    if rows is not None:
        w, b = w[rows], (None if b is None else b[rows])
    flat[f"{ours}/kernel"], src[f"{ours}/kernel"] = np.ascontiguousarray(w.T), f"{key}.weight{sel}.T"
    if b is None:  # a layer built without bias (e.g. qkv_bias=False): our bias is that zero
        flat[f"{ours}/bias"], src[f"{ours}/bias"] = np.zeros((w.shape[0],), np.float32), f"zeros (no {key}.bias)"
    else:
        flat[f"{ours}/bias"], src[f"{ours}/bias"] = b, f"{key}.bias{sel}"


def timm_to_flat(state_dict: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A timm DeiT state dict in our layout: ``({our_path: array}, {our_path: source description})``.

    Raises :class:`UnsupportedCheckpointError` for distilled checkpoints and
    for any key it cannot place.
    """
    sd = _normalize(state_dict)
    _check_distillation(sd)
    used: set[str] = set()

    def take(k: str) -> np.ndarray:
        if k not in sd:
            raise KeyError(f"the state dict has no {k!r}: not a timm DeiT / ViT state dict?")
        used.add(k)
        return np.array(sd[k], np.float32)  # a copy: never aliases the source tensors

    def maybe(k: str) -> np.ndarray | None:
        return take(k) if k in sd else None

    flat: dict[str, np.ndarray] = {}
    src: dict[str, str] = {}
    for name in ("cls_token", "pos_embed"):
        flat[name], src[name] = take(name), name
    flat["patch_embed/kernel"] = np.ascontiguousarray(take("patch_embed.proj.weight").transpose(2, 3, 1, 0))
    src["patch_embed/kernel"] = "patch_embed.proj.weight.permute(2,3,1,0)"
    flat["patch_embed/bias"], src["patch_embed/bias"] = take("patch_embed.proj.bias"), "patch_embed.proj.bias"
    for ours, theirs in (("norm/scale", "norm.weight"), ("norm/bias", "norm.bias")):
        flat[ours], src[ours] = take(theirs), theirs
    if "head.weight" in sd:
        _linear(flat, src, "head", "head", take("head.weight"), maybe("head.bias"))

    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    d = flat["cls_token"].shape[-1]
    for i in range(depth):
        b, o = f"blocks.{i}", f"blocks/{i}"
        for n in ("norm1", "norm2"):
            flat[f"{o}/{n}/scale"], src[f"{o}/{n}/scale"] = take(f"{b}.{n}.weight"), f"{b}.{n}.weight"
            flat[f"{o}/{n}/bias"], src[f"{o}/{n}/bias"] = take(f"{b}.{n}.bias"), f"{b}.{n}.bias"
        qkv_w, qkv_b = take(f"{b}.attn.qkv.weight"), maybe(f"{b}.attn.qkv.bias")
        if qkv_w.shape != (3 * d, d):
            raise UnsupportedCheckpointError(f"{b}.attn.qkv.weight has shape {qkv_w.shape}, expected (3*{d}, {d})")
        for j, part in enumerate("qkv"):
            _linear(flat, src, f"{o}/attn/{part}/linear", f"{b}.attn.qkv", qkv_w, qkv_b, slice(j * d, (j + 1) * d))
        _linear(
            flat,
            src,
            f"{o}/attn/proj/linear",
            f"{b}.attn.proj",
            take(f"{b}.attn.proj.weight"),
            maybe(f"{b}.attn.proj.bias"),
        )
        for fc in ("fc1", "fc2"):
            _linear(
                flat,
                src,
                f"{o}/mlp/{fc}/linear",
                f"{b}.mlp.{fc}",
                take(f"{b}.mlp.{fc}.weight"),
                maybe(f"{b}.mlp.{fc}.bias"),
            )

    unused = sorted(set(sd) - used)
    if unused:
        hint = ""
        if any(".ls1." in k or ".ls2." in k for k in unused):
            hint = " (layer scale 'ls1'/'ls2': a DeiT-III / CaiT-style model, not supported)"
        elif any("q_norm" in k or "k_norm" in k for k in unused):
            hint = " (QK-norm: not supported)"
        raise UnsupportedCheckpointError(
            f"{len(unused)} tensor(s) of the state dict have no place in this model{hint}: "
            f"{unused[:12]}{' ...' if len(unused) > 12 else ''}"
        )
    return flat, src


def _shape_hint(path: str, have: tuple, want: tuple) -> str:
    if path == "pos_embed":
        return (
            f"; the checkpoint has {have[1] - 1} patches, the model {want[1] - 1}: "
            "create the model with the checkpoint's image_size (and patch_size)"
        )
    if path.startswith("head/"):
        return "; the class count differs: create the model with num_classes to match, or pass skip_head=True"
    if path == "patch_embed/kernel":
        return "; patch size or input channels differ (kernel is (p, p, C, D))"
    return "; embed_dim / mlp_ratio differ: pick the matching variant"


def load_timm_state_dict(
    model: VisionTransformer, state_dict: Mapping[str, Any], *, skip_head: bool = False
) -> ImportReport:
    """Copy a timm DeiT state dict into ``model`` (in place) and report what was copied.

    Works for every preset: the tensors a DeiT has (patch embedding, tokens,
    position embedding, LayerNorms, q/k/v/proj/fc1/fc2 kernels and biases,
    head) are copied into the latent weights; binary-only parameters keep
    their initialisation and are listed in ``report.left_at_init``.

    Args:
      model: a :class:`~bvit_jax.nn.models.VisionTransformer` of matching shape.
      state_dict: a timm model's ``state_dict()`` (torch tensors or numpy arrays),
        or a loaded DeiT checkpoint (``{"model": ...}``).
      skip_head: leave the classifier at its initialisation (fine-tuning on
        another class count); the source head is then ignored.

    Raises:
      UnsupportedCheckpointError: a distilled DeiT (``dist_token``/``head_dist``) or unplaceable keys.
      ValueError: a shape or depth mismatch (the message says which setting differs).
    """
    flat, src = timm_to_flat(state_dict)
    if skip_head:
        for k in ("head/kernel", "head/bias"):
            flat.pop(k, None)
            src.pop(k, None)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    model_paths = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}

    extra = sorted(set(flat) - set(model_paths))
    if extra:
        src_depth = 1 + max((int(m.group(1)) for k in flat if (m := re.match(r"blocks/(\d+)/", k))), default=-1)
        raise UnsupportedCheckpointError(
            f"the state dict has tensors the model lacks ({extra[:6]}{' ...' if len(extra) > 6 else ''}); "
            f"state dict depth {src_depth}, model depth {model.cfg.depth}: create the model with depth={src_depth}"
        )
    missing = sorted(
        p for p in model_paths if SHARED_PATH.match(p) and p not in flat and not (skip_head and p.startswith("head/"))
    )
    if missing:
        raise UnsupportedCheckpointError(
            f"the state dict lacks {len(missing)} tensor(s) the model has: {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''} (model depth {model.cfg.depth}: a shallower checkpoint?)"
        )
    for p, arr in flat.items():
        want = tuple(model_paths[p].shape)
        if tuple(arr.shape) != want:
            raise UnsupportedCheckpointError(
                f"{src[p]} has shape {tuple(arr.shape)} but {p} is {want}{_shape_hint(p, arr.shape, want)}"
            )

    def place(keypath, leaf):
        p = path_str(keypath)
        return jnp.asarray(flat[p], dtype=leaf.dtype) if p in flat else leaf

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(place, pure))
    nnx.update(model, state)
    return ImportReport(
        copied={p: src[p] for p in sorted(flat)},
        left_at_init={p: int(math.prod(model_paths[p].shape)) for p in sorted(model_paths) if p not in flat},
        num_copied=int(sum(a.size for a in flat.values())),
    )


def _arch_from_state_dict(flat: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Architecture fields a state dict determines: width, depth, patch, channels, image size, classes."""
    d = flat["cls_token"].shape[-1]
    p, _, c, _ = flat["patch_embed/kernel"].shape
    n = flat["pos_embed"].shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise UnsupportedCheckpointError(f"pos_embed has {n} patch positions, not a square grid")
    arch = {
        "embed_dim": int(d),
        "patch_size": int(p),
        "in_channels": int(c),
        "image_size": int(side * p),
        "depth": 1 + max((int(m.group(1)) for k in flat if (m := re.match(r"blocks/(\d+)/", k))), default=-1),
    }
    if "blocks/0/mlp/fc1/linear/kernel" in flat:
        arch["mlp_ratio"] = flat["blocks/0/mlp/fc1/linear/kernel"].shape[1] / d
    if "head/kernel" in flat:
        arch["num_classes"] = int(flat["head/kernel"].shape[1])
    return arch


def from_timm(
    name: str,
    state_dict: Mapping[str, Any] | str | Path,
    preset: str = "fp",
    *,
    skip_head: bool = False,
    seed: int = 0,
    dtype: Any = jnp.float32,
    **overrides,
) -> tuple[VisionTransformer, ImportReport]:
    """Build our model for a timm DeiT and import its weights: ``(model, report)``.

    ``name``: ``deit_{tiny,small,base}_patch16_<res>`` (a ``.tag`` suffix is
    ignored) or ``deit_{tiny,small,base}``. Depth, image size, input channels
    and class count are read from the state dict (so ``timm.create_model(...,
    depth=2)`` models import too); ``overrides`` (any :func:`~bvit_jax.nn.models.create`
    field) win. ``preset="fp"`` gives the teacher; a binary preset gives a
    student whose latent weights start from DeiT's. ``state_dict`` may be a
    path (see :func:`load_state_dict_file`).
    """
    info = parse_timm_name(name)
    if isinstance(state_dict, (str, Path)):
        state_dict = load_state_dict_file(state_dict)
    state_dict = _normalize(state_dict)  # torch -> numpy once
    flat, _ = timm_to_flat(state_dict)
    arch = _arch_from_state_dict(flat)
    variant = get_variant(info["variant"])
    if arch["embed_dim"] != variant.embed_dim:
        raise UnsupportedCheckpointError(
            f"{name}: the state dict is {arch['embed_dim']} wide, {info['variant']} is {variant.embed_dim}"
        )
    if "patch_size" in info and arch["patch_size"] != info["patch_size"]:
        raise UnsupportedCheckpointError(
            f"{name}: the state dict has {arch['patch_size']} px patches, the name says {info['patch_size']}"
        )
    kw = {k: v for k, v in arch.items() if getattr(variant, k) != v and k != "embed_dim"}
    if skip_head:
        kw.pop("num_classes", None)
    kw.update(overrides)
    model = create(info["variant"], preset, dtype=dtype, seed=seed, **kw)
    return model, load_timm_state_dict(model, state_dict, skip_head=skip_head)


# ----------------------------------------------------------------------------- workdir
def write_workdir(model: VisionTransformer, config, workdir: str | Path, *, report: ImportReport | None = None) -> Path:
    """Write ``model`` as a trainer workdir: ``config.json`` + ``best/`` (+ ``import_report.json``).

    ``config`` is an ml_collections config (``configs/...`` ``get_config``);
    its model and data fields are set to describe ``model``, and
    :func:`bvit_jax.runs.workdir.save_model` writes both, so that
    :func:`bvit_jax.runs.workdir.restore` rebuilds the model and the trainer
    accepts the workdir as ``distill.teacher_workdir``. Refuses a workdir
    that already holds checkpoints.
    """
    from bvit_jax.runs.workdir import save_model  # orbax: needed by this command only

    cfg = model.cfg
    variant = get_variant(config.model.variant)
    overrides = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in ("num_classes", "image_size", "in_channels")
        and getattr(cfg, f.name) != getattr(variant, f.name)
    }
    with config.unlocked():
        config.model.num_classes = cfg.num_classes
        config.data.image_size = cfg.image_size
        config.data.channels = cfg.in_channels
        for k, v in overrides.items():
            config.model.overrides[k] = v
    workdir = save_model(workdir, config, model)
    if report is not None:
        (workdir / "import_report.json").write_text(json.dumps(report.to_json(), indent=2))
    return workdir


# ----------------------------------------------------------------------------- command line
def _define_flags(fv, argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("timm_model", None, "timm name, e.g. deit_small_patch16_224.", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "State dict file: .pth / .pt / .bin / .safetensors / .npz.", flag_values=fv)
    flags.DEFINE_string("workdir", None, "Output workdir (config.json + best/).", flag_values=fv)
    flags.DEFINE_string(
        "preset",
        "fp",
        "Preset of the model to build (fp: a teacher; a binary preset: an initialised student).",
        flag_values=fv,
    )
    flags.DEFINE_bool("skip_head", False, "Leave the classifier at its initialisation.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Initialisation seed of the parameters the checkpoint lacks.", flag_values=fv)
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config to record (default: bvit_jax.train.recipes.imagenet_deit_config(<variant>, <preset>), "
        "as configs/imagenet_deit.py:<variant>,<preset>); its model/data fields are set from the checkpoint.",
        flag_values=fv,
        sys_argv=argv,
    )
    flags.mark_flags_as_required(["timm_model", "checkpoint", "workdir"], flag_values=fv)


def _run(fv, args: list[str]) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; bvit-convert takes only flags")
    info = parse_timm_name(fv["timm_model"].value)
    config = fv["config"].value
    if config is None:
        config = imagenet_deit_config(info["variant"], fv["preset"].value)
    elif config.model.preset != fv["preset"].value and fv["preset"].present:
        raise UserError(f"--preset={fv['preset'].value} disagrees with the config's model.preset={config.model.preset}")
    with config.unlocked():
        config.model.variant = info["variant"]
    preset = config.model.preset
    model, report = from_timm(
        fv["timm_model"].value,
        fv["checkpoint"].value,
        preset=preset,
        skip_head=fv["skip_head"].value,
        seed=fv["seed"].value,
        **config_overrides(config.model.get("overrides")),
    )
    out = write_workdir(model, config, fv["workdir"].value, report=report)
    print(report)
    print(
        f"wrote {out}/config.json and {out}/best/ ({info['variant']}, preset {preset}, "
        f"{model.cfg.depth} blocks, {model.cfg.image_size} px, {model.cfg.num_classes} classes)"
    )
    if preset == "fp":
        print(f"use it as a teacher: --config.distill.teacher_workdir={out}")
    return 0


main = cli.command(
    "bvit-convert",
    "Import timm DeiT weights as a trainer workdir (a teacher, or an initialised "
    "binary student):\n\n    bvit-convert --timm_model=deit_small_patch16_224 "
    "--checkpoint=deit_small_patch16_224.pth --workdir=workdirs/deit_small_timm",
    _define_flags,
    _run,
)


if __name__ == "__main__":
    sys.exit(main())
