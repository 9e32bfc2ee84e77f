"""The run folder ("workdir"): what a run writes, and the one place that reads it back.

Layout of a workdir::

    config.json            the run's config as JSON (ml_collections' ``to_json_best_effort``;
                           unset ``model.overrides`` placeholders as null)
    checkpoints/<step>/    the last ``keep_checkpoints`` train states, each {state, data, config}
    best/<step>/           the model variables with the best eval top-1 (one kept)
    metrics.jsonl          one JSON object per log step (:mod:`bvit_jax.train.metric_writers`)
    tensorboard/           the same scalars as TensorBoard event files
    damaged_checkpoints/   step folders that failed to restore at a resume, set aside (never deleted)
    import_report.json     only in a workdir written by :mod:`bvit_jax.interop.timm`

This module owns ``config.json`` (:func:`write_config`, :func:`load_config`),
the model a run config describes (:func:`build_model`, concrete or abstract,
through :func:`bvit_jax.nn.models.from_config`), and restoring a trained model
from a workdir (:func:`restore`: ``(config, model, params)`` of the best or
the latest checkpoint; :func:`restore_params` without the model).
:mod:`bvit_jax.runs.checkpoint` reads and writes the two checkpoint folders with
orbax and knows nothing of models; the trainer, export, convert and the
ablation report read and write workdirs through this module.

    config, model, params = restore("workdirs/fmnist_binaryvit")   # best; which="latest"
    logits = model(images)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bvit_jax.errors import ConfigError, UserError
from bvit_jax.nn.models import VisionTransformer, from_config, model_variables
from bvit_jax.nn.precision import compute_dtype
from bvit_jax.runs import storage
from bvit_jax.runs.checkpoint import CheckpointError, CheckpointStore, Placement, read_params

__all__ = [
    "CONFIG_FILE",
    "Restored",
    "config_dict",
    "has_config",
    "write_config",
    "load_config",
    "build_model",
    "abstract_params",
    "restore_params",
    "restore",
    "save_model",
]

CONFIG_FILE = "config.json"


class Restored(NamedTuple):
    """What :func:`restore` returns: unpacks as ``config, model, params``."""

    config: dict  # the run's config.json
    model: VisionTransformer  # the model of ``config``, holding ``params``, in eval mode
    params: Any  # its variables as a pure dict (host-local, or as placed): parameters (and BatchNorm statistics)


# ----------------------------------------------------------------------------- config.json
def config_dict(config: Any) -> dict:
    """A run config as a plain JSON-ready dict: an ml_collections config, or a dict (copied)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config)))


def has_config(workdir: storage.PathLike) -> bool:
    """Whether ``workdir`` holds a run's ``config.json`` (a workdir of this trainer, or of convert)."""
    return (storage.as_path(workdir) / CONFIG_FILE).is_file()


def write_config(workdir: storage.PathLike, config: Any) -> storage.epath.Path:
    """Write ``config`` (an ml_collections config or a dict) as ``workdir/config.json``; returns its path.

    Replaced atomically (:func:`bvit_jax.runs.storage.atomic_write_text`): a
    preemption during the write leaves the previous file whole.
    """
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2)
    else:
        text = json.dumps(config_dict(config), indent=2)
    return storage.atomic_write_text(storage.as_path(workdir) / CONFIG_FILE, text)


def load_config(workdir: storage.PathLike) -> dict:
    """The ``config.json`` a run wrote into its workdir, as a dict.

    Raises :class:`bvit_jax.runs.checkpoint.CheckpointError` when there is none.
    """
    path = storage.as_path(workdir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path} not found: {workdir} is not a workdir of this trainer (no {CONFIG_FILE}).")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- the model of a config
def build_model(
    config: Mapping[str, Any], *, seed: int = 0, dtype: Any = None, abstract: bool = False
) -> VisionTransformer:
    """The model a run config describes: :func:`bvit_jax.nn.models.from_config`.

    ``config``: an ml_collections config or the dict of a ``config.json``
    (its ``model`` and ``data`` entries are read). ``seed`` initialises the
    parameters; ``dtype`` is the compute dtype (None: the config's
    ``model.dtype``, float32 when unset; ``'auto'`` is bfloat16 on GPU/TPU and
    float32 on CPU, :func:`bvit_jax.nn.precision.compute_dtype`; parameters are
    float32 either way).
    ``abstract=True`` builds it under ``nnx.eval_shape``: shapes and dtypes
    only, nothing allocated. A config value that cannot build a model (an
    unknown override, a field set in the wrong place) raises
    :class:`bvit_jax.errors.ConfigError` naming the valid fields.
    """
    if dtype is None:
        dtype = config["model"].get("dtype") or "float32"
    if isinstance(dtype, str):  # 'auto': bfloat16 on GPU/TPU, float32 on CPU
        dtype = compute_dtype(dtype)

    def make() -> VisionTransformer:
        return from_config(config, seed=seed, dtype=dtype)

    try:
        return nnx.eval_shape(make) if abstract else make()
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise ConfigError(str(e)) from None


def abstract_params(config: Mapping[str, Any]) -> Any:
    """Shape/dtype tree (``ShapeDtypeStruct`` s, pure-dict layout) of the variables of ``config``'s model.

    The parameters and, with ``branch_norm='batchnorm'``, the BatchNorms'
    running statistics (:func:`bvit_jax.nn.models.model_variables`).
    """
    return model_variables(build_model(config, abstract=True))


# ----------------------------------------------------------------------------- restoring
def restore_params(
    workdir: storage.PathLike, which: str = "best", *, placement: Placement | None = None
) -> tuple[dict, Any]:
    """``(config, params)`` from a workdir: its best model or its latest train state.

    ``which="best"`` falls back to the latest checkpoint when no eval has run.
    ``params`` are the model's variables (parameters, and with
    ``branch_norm='batchnorm'`` the running statistics beside them) in the
    model's pure-dict layout: host-local arrays, or with ``placement`` (a
    function from the shape tree to a tree of shardings) restored straight
    into those shardings (:func:`bvit_jax.runs.checkpoint.read_params`).
    """
    config = load_config(workdir)
    return config, read_params(workdir, abstract_params(config), which, placement=placement)


def restore(
    workdir: storage.PathLike, which: str = "best", *, dtype: Any = None, placement: Placement | None = None
) -> Restored:
    """``(config, model, params)`` of a workdir: the model of its config.json, holding the saved parameters.

    ``which``: ``"best"`` (the best eval checkpoint; the latest train state
    when no eval has run) or ``"latest"``. ``dtype`` is the model's compute
    dtype (None: the config's ``model.dtype``). The model is built without
    initialising anything (its structure from ``nnx.eval_shape``), then
    given the restored variables (parameters and BatchNorm statistics), in
    inference mode. ``placement`` (shape tree -> tree of shardings) restores
    every array straight into its sharding, e.g. over a mesh that spans
    several processes (the KD teacher of a multi-host run); None restores
    host-local arrays on this process's first device.
    """
    config = load_config(workdir)
    abstract = build_model(config, dtype=dtype, abstract=True)
    graphdef, state = nnx.split(abstract)
    params = read_params(workdir, nnx.to_pure_dict(state), which, placement=placement)
    nnx.replace_by_pure_dict(state, params)
    return Restored(config, nnx.merge(graphdef, state), params)


# ----------------------------------------------------------------------------- writing a model
def save_model(workdir: storage.PathLike, config: Any, model: nnx.Module) -> storage.epath.Path:
    """Write ``model`` and the config that describes it as a new workdir: ``config.json`` + ``best/``.

    The parameters are saved as the best model (step 0, ``eval_top1`` 0: not
    evaluated), so :func:`restore` and the trainer (as
    ``distill.teacher_workdir``) read the folder like a trained run's.
    ``config`` must build a model of ``model``'s parameter shapes (checked,
    ``ValueError`` naming the first differences). Refuses (``FileExistsError``)
    a folder that already holds checkpoints.
    """
    workdir = storage.as_path(workdir)
    for sub in ("best", "checkpoints"):
        if (workdir / sub).exists() and any((workdir / sub).iterdir()):
            raise FileExistsError(f"{workdir / sub} already holds checkpoints: use a new --workdir")
    params = model_variables(model)
    shape = lambda tree: {
        jax.tree_util.keystr(k): (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in jax.tree.leaves_with_path(tree)
    }
    have, want = shape(params), shape(abstract_params(config))
    if have != want:
        diffs = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
        raise ValueError(
            f"the config does not describe this model: {len(diffs)} parameters differ, e.g. "
            + "; ".join(f"{k}: model {have.get(k)}, config {want.get(k)}" for k in diffs[:4])
        )
    write_config(workdir, config)
    store = CheckpointStore(workdir, async_save=False)
    try:
        store.save_best(0, params, 0.0)
    finally:
        store.close()
    return workdir
