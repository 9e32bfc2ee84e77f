"""``train_and_evaluate(config, workdir)``: the whole training run, top to bottom.

Sections, in order: config checks -> mesh -> input -> model (and teacher) ->
optimizer -> train state and shardings -> step functions -> restore -> loop
(log, diagnostics, eval, checkpoint, preemption). The same code runs in a
Colab cell on CPU, on one GPU, on 8 fake CPU devices and on a multi-host TPU
pod (each process feeds its own share of every global batch).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bvit_jax import cli
from bvit_jax import data as input_pipeline
from bvit_jax.errors import ConfigError, UserError
from bvit_jax.nn.binarize import get_kernel_binarizer
from bvit_jax.nn.models import PRESETS, REMAT_POLICIES, VARIANTS, drop_path_keys, model_variables, training_view
from bvit_jax.nn.param_groups import latent_weight_mask
from bvit_jax.nn.precision import COMPUTE_DTYPES, compute_dtype
from bvit_jax.nn.summary import print_summary, summary
from bvit_jax.runs import storage
from bvit_jax.runs.checkpoint import DATA_RESUME, CheckpointStore, Placement
from bvit_jax.runs.workdir import build_model, config_dict, has_config, restore, write_config
from bvit_jax.train import diagnostics, sharding
from bvit_jax.train.grad_accum import accumulated_value_and_grad
from bvit_jax.train.grs import frozen_share
from bvit_jax.train.losses import cross_entropy, distillation_kl, topk_correct
from bvit_jax.train.metric_writers import MetricWriter
from bvit_jax.train.optim import GRS_COUPLINGS, GRS_SCHEDULES, applied_learning_rate, build_optimizer
from bvit_jax.train.preemption import PreemptionWatch
from bvit_jax.train.throughput import Profile, StepTimer, peak_flops, train_flops_per_image

__all__ = [
    "main",
    "train_and_evaluate",
    "make_train_step",
    "init_train_state",
    "split_for_training",
    "batch_stats_of",
    "validate_config",
    "ConfigError",
    "steps_from",
    "load_teacher",
    "evaluate",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or gradient became NaN/Inf; the run stopped without saving, the message says how to resume."""


# ----------------------------------------------------------------------------- config
def steps_from(config, name: str, steps_per_epoch: float) -> int:
    """A duration given as ``{name}_steps`` (if > 0) or ``{name}_epochs``, in steps."""
    steps = config.get(f"{name}_steps", 0) or 0
    if steps > 0:
        return int(steps)
    return int(round((config.get(f"{name}_epochs", 0) or 0) * steps_per_epoch))


def validate_config(config, num_devices: int, process_count: int) -> None:
    """Catch config errors before anything compiles, each with its fix."""
    m = config.model
    if m.variant not in VARIANTS:
        raise ConfigError(f"config.model.variant={m.variant!r} is unknown; choose one of {sorted(VARIANTS)}")
    if m.preset not in PRESETS:
        raise ConfigError(f"config.model.preset={m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
    if m.dtype not in ("auto", *COMPUTE_DTYPES):
        raise ConfigError(
            f"config.model.dtype={m.dtype!r}: use 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'"
        )
    rate = m.get("drop_path_rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(
            f"config.model.drop_path_rate={rate!r} must be a number in [0, 1): the stochastic depth rate of the "
            "last block (block i of L drops with rate * i / (L - 1)); 0 turns it off"
        )
    if m.get("remat_policy", "none") not in REMAT_POLICIES:
        raise ConfigError(
            f"config.model.remat_policy={m.get('remat_policy')!r} is unknown; choose one of {list(REMAT_POLICIES)} "
            "('none': keep every activation; 'full': recompute each block in the backward pass)"
        )
    clip = config.optimizer.get("latent_weight_clip", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < float("inf"):
        raise ConfigError(
            f"config.optimizer.latent_weight_clip={clip!r} must be a finite number >= 0 (latent binary weights are "
            "clipped to [-c, c] after each update; 0 turns it off; c <= 1 keeps them inside the STE window)"
        )
    b = config.global_batch_size
    if b <= 0 or b % num_devices:
        raise ConfigError(
            f"config.global_batch_size={b} is not divisible by the {num_devices} devices of the mesh "
            f"(data x fsdp); use a multiple of {num_devices}"
        )
    if config.eval_batch_size <= 0 or config.eval_batch_size % num_devices:
        raise ConfigError(
            f"config.eval_batch_size={config.eval_batch_size} must be a positive multiple of the {num_devices} devices"
        )
    if b % process_count:
        raise ConfigError(f"config.global_batch_size={b} is not divisible by the {process_count} processes")
    k = config.optimizer.grad_accum_steps
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"config.optimizer.grad_accum_steps={k!r} must be an integer >= 1")
    if b % (k * num_devices):
        raise ConfigError(
            f"config.global_batch_size={b} (the batch of one optimizer update) does not split into "
            f"config.optimizer.grad_accum_steps={k} micro-batches that divide over the {num_devices} devices; "
            f"use a multiple of {k * num_devices}"
        )
    for name in ("log_every_steps", "checkpoint_every_steps"):
        if not isinstance(config[name], int) or config[name] < 1:
            raise ConfigError(f"config.{name}={config[name]!r} must be an integer >= 1 (it is an interval in steps)")
    for name in ("eval_every_steps", "diagnostics_every_steps"):
        if not isinstance(config[name], int) or config[name] < 0:
            raise ConfigError(f"config.{name}={config[name]!r} must be an integer >= 0 (0 turns it off)")
    if config.grs.strength < 0:
        raise ConfigError(
            f"config.grs.strength={config.grs.strength} is negative; GRS strength must be >= 0 (0 turns it off)"
        )
    _validate_grs(config.grs)
    _validate_run_fields(config)
    if (config.get("total_steps", 0) or 0) <= 0 and (config.get("total_epochs", 0) or 0) <= 0:
        raise ConfigError("set config.total_steps or config.total_epochs to a positive value")
    d = config.distill
    if d.enabled:  # the config alone says whether the run distils (recipes: on for the binary presets)
        if not d.teacher_workdir:
            raise ConfigError(
                f"preset {m.preset!r} distils from an fp teacher but config.distill.teacher_workdir is empty: "
                "train the teacher first (preset 'fp') and pass its workdir, or set config.distill.enabled=False"
            )
        if not has_config(d.teacher_workdir):
            raise ConfigError(
                f"config.distill.teacher_workdir={d.teacher_workdir!r} holds no run of this trainer "
                "(no config.json); check the path or train the teacher first"
            )
        if d.kd_weight < 0 or d.label_weight < 0 or d.kd_weight + d.label_weight == 0:
            raise ConfigError("config.distill.kd_weight and label_weight must be >= 0 and not both 0")
        if d.get("teacher_dtype", "") not in ("", "auto", *COMPUTE_DTYPES):
            raise ConfigError(
                f"config.distill.teacher_dtype={d.teacher_dtype!r}: use '' (the teacher run's own dtype), "
                "'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'"
            )


def _validate_run_fields(config) -> None:
    """Resume and profiling fields."""
    if config.get("data_resume", "exact") not in DATA_RESUME:
        raise ConfigError(f"config.data_resume={config.data_resume!r} is unknown; choose one of {list(DATA_RESUME)}")
    for name in ("profile_first_step", "profile_steps"):
        value = config.get(name, 0)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"config.{name}={value!r} must be an integer >= 0")


def _validate_grs(g) -> None:
    """The GRS schedule and freezing fields of ``config.grs``."""
    kind = g.get("schedule", "constant")
    if kind not in GRS_SCHEDULES:
        raise ConfigError(f"config.grs.schedule={kind!r} is unknown; choose one of {list(GRS_SCHEDULES)}")
    for name in ("warmup", "ramp_start", "ramp"):
        for unit in ("steps", "epochs"):
            value = g.get(f"{name}_{unit}", 0) or 0
            if value < 0:
                raise ConfigError(f"config.grs.{name}_{unit}={value} is negative; durations must be >= 0")
    warm = (g.get("warmup_steps", 0) or 0) > 0 or (g.get("warmup_epochs", 0) or 0) > 0
    ramp = any((g.get(f, 0) or 0) > 0 for f in ("ramp_start_steps", "ramp_start_epochs", "ramp_steps", "ramp_epochs"))
    if kind != "constant" and warm:
        raise ConfigError(
            f"config.grs.warmup_steps/warmup_epochs is the warm-up of schedule 'constant', not of {kind!r}: "
            "set it to 0 and give the ramp with config.grs.ramp_start_* and config.grs.ramp_*"
        )
    if kind == "lr" and (warm or ramp):
        raise ConfigError(
            "config.grs.schedule='lr' follows the learning rate (its warm-up and decay): "
            "set config.grs.warmup_* and config.grs.ramp_* to 0"
        )
    coupling = g.get("coupling", "coupled")
    if coupling not in GRS_COUPLINGS:
        raise ConfigError(f"config.grs.coupling={coupling!r} is unknown; choose one of {list(GRS_COUPLINGS)}")
    if coupling == "decoupled" and kind == "lr":
        raise ConfigError(
            "config.grs.coupling='decoupled' already scales the pull by the learning rate (lr_t * lambda_t); "
            "with config.grs.schedule='lr' it would follow lr_t^2: use schedule 'constant' (or a ramp)"
        )
    if g.get("adaptive", False):
        if coupling != "coupled":
            raise ConfigError(
                "config.grs.adaptive (ReBNN's strength from the loss gradient) needs config.grs.coupling='coupled': "
                "after AdamW the loss gradient is gone"
            )
        lo, hi = g.get("adaptive_min", 1e-5), g.get("adaptive_max", 2e-4)
        if not 0 <= lo <= hi:
            raise ConfigError(f"config.grs.adaptive_min={lo} and adaptive_max={hi} must satisfy 0 <= min <= max")
        if not g.strength > 0:
            raise ConfigError(
                "config.grs.adaptive needs config.grs.strength > 0 (the strength switches GRS on and its schedule "
                "shapes the adaptive lambda, which comes from adaptive_min/adaptive_max)"
            )
    if kind == "constant" and ramp:
        raise ConfigError(
            "config.grs.ramp_start_*/ramp_* only apply to config.grs.schedule='linear' or 'cosine'; "
            "set the schedule, or set them to 0 (for a linear warm-up of 'constant' use config.grs.warmup_*)"
        )
    for name, note in (("freeze_threshold", "; 0 turns freezing off"), ("freeze_momentum", "")):
        value = g.get(name, 0.0)
        if not 0 <= value < 1:
            raise ConfigError(f"config.grs.{name}={value} must be in [0, 1){note}")


# ----------------------------------------------------------------------------- teacher
# The input statistics a teacher must share with its student: it is fed the student's batches.
TEACHER_INPUT_FIELDS = ("image_size", "channels", "mean", "std", "interpolation")


def load_teacher(config, placement: Placement | None = None) -> tuple[nnx.GraphDef, Any]:
    """``(graphdef, variables)`` of the frozen KD teacher: the best model of ``config.distill.teacher_workdir``.

    Read through :func:`bvit_jax.runs.workdir.restore` (any workdir of this
    trainer, or one :mod:`bvit_jax.interop.timm` wrote; a local folder or a
    ``gs://`` URL), with the compute dtype ``config.distill.teacher_dtype``
    (empty: the teacher run's own ``model.dtype``; ``'auto'``: bfloat16 on
    GPU/TPU, float32 on CPU, as either ``'auto'`` resolves by
    :func:`bvit_jax.nn.precision.compute_dtype`; ``'bfloat16'`` for a
    cheaper teacher forward on accelerators, float32 parameters and logits
    either way). ``placement`` (shape tree -> shardings) restores the
    variables straight into the run's shardings: on a mesh that spans
    several processes a host-local copy could not be moved there. The
    teacher must see the student's inputs and predict its classes: a
    different ``model.num_classes`` or any of :data:`TEACHER_INPUT_FIELDS`
    of ``data`` (size, channels, normalisation mean and std, resize
    interpolation) is a :class:`ConfigError` naming both values.
    """
    dtype = config.distill.get("teacher_dtype", "") or None
    tcfg, tmodel, tparams = restore(config.distill.teacher_workdir, which="best", dtype=dtype, placement=placement)
    resolved = compute_dtype(dtype or tcfg["model"].get("dtype") or "float32")
    log.info("teacher compute dtype %s (config.distill.teacher_dtype=%r, parameters float32)", resolved, dtype or "")
    t, s = tcfg["model"], config.model
    if t["num_classes"] != s.num_classes:
        raise ConfigError(
            f"teacher in {config.distill.teacher_workdir} has {t['num_classes']} classes, student {s.num_classes}"
        )
    student_data = config_dict(config)["data"]
    for k in TEACHER_INPUT_FIELDS:
        if k in tcfg["data"] and not _same_setting(tcfg["data"][k], student_data.get(k)):
            raise ConfigError(
                f"teacher in {config.distill.teacher_workdir} was trained with data.{k}={tcfg['data'][k]}, "
                f"the student uses data.{k}={student_data.get(k)}: the teacher is fed the student's batches, "
                "so they must be preprocessed alike (set the student's field to the teacher's, or use a teacher "
                "trained on the same preprocessing)"
            )
    return nnx.graphdef(tmodel), tparams  # the model in eval mode; tparams: all its variables


def _same_setting(a: Any, b: Any) -> bool:
    """Two config values as JSON gives them: equal, numbers compared as floats, one value vs a per-channel list."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        try:
            va, vb = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
        except (ValueError, TypeError):
            return False
        return bool(np.array_equal(va, vb))
    return a == b


# ----------------------------------------------------------------------------- step
def split_for_training(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, params, batch_stats)`` of a model (built for inference) as the train step runs it.

    ``graphdef`` is that of :func:`bvit_jax.nn.models.training_view` (BatchNorms
    normalise with batch statistics); ``params`` (``nnx.Param``) and
    ``batch_stats`` (``nnx.BatchStat``, ``{}`` without BatchNorm) are pure dicts.
    """
    graphdef, params, batch_stats = nnx.split(training_view(model), nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def init_train_state(
    params: Any, tx: optax.GradientTransformation, latent: Any, batch_stats: Any = None
) -> dict[str, Any]:
    """The train state: step counter, params, optimizer state, oscillation EMA (binary presets).

    ``batch_stats`` (the BatchNorms' running averages, a pure dict) becomes
    ``state['batch_stats']`` when the model has any; a model without has no
    such entry, so its checkpoints are those of earlier versions.
    """
    has_latent = any(jax.tree.leaves(latent))
    state = {
        "step": jnp.zeros([], jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "oscillation": diagnostics.oscillation_init(params, latent) if has_latent else {},
    }
    if jax.tree.leaves(batch_stats):
        state["batch_stats"] = batch_stats
    return state


def batch_stats_of(state: dict[str, Any]) -> Any:
    """The train state's BatchNorm running averages (``{}`` for a model without BatchNorm)."""
    return state.get("batch_stats", {})


def make_train_step(
    config,
    graphdef: nnx.GraphDef,
    latent: Any,
    tx: optax.GradientTransformation,
    teacher_graphdef: nnx.GraphDef | None = None,
    *,
    flips_from: int = 0,
):
    """``train_step(state, batch, teacher_params) -> (state, metrics)``, not yet jitted.

    ``graphdef``: the model as it trains (:func:`bvit_jax.nn.models.training_view`),
    split into ``nnx.Param`` and ``nnx.BatchStat``; a model with BatchNorm
    normalises with the statistics of each (micro-)batch and the new running
    averages go into ``state['batch_stats']``.
    One call is one optimizer update on the global batch. The loss is the label
    cross-entropy, or with a teacher (``teacher_graphdef`` not None)
    ``kd_weight * KL(teacher || student) + label_weight * CE`` from
    ``config.distill``. Its gradient is averaged over
    ``config.optimizer.grad_accum_steps`` micro-batches
    (:func:`bvit_jax.train.grad_accum.accumulated_value_and_grad`); then ``tx``
    (GRS -> clip -> AdamW), a non-finite guard, and the flip-rate /
    oscillation statistics and the share of latent weights outside the
    straight-through window of the config's kernel binarizer (its ``ste_window``;
    ``outside_window/all``, :func:`bvit_jax.train.diagnostics.outside_ste_window_share`) when ``latent``
    marks binary kernels, with the shares of never-flipped weights (since
    step ``flips_from``, the trainer passes the end of the warm-up) and of
    silent weights (:func:`bvit_jax.train.diagnostics.oscillation_update`).
    ``lr`` in the metrics is the learning rate this update applied.

    Drop path (``config.model.drop_path_rate > 0``; the model, built from the
    same config, holds the per-block rates): example ``b`` of the global batch
    draws from :func:`bvit_jax.nn.models.drop_path_keys` ``(config.seed, step,
    b)``, a function of the seed, the step counter and its row only, so a
    resumed run repeats the uninterrupted one bit for bit with nothing new in
    the checkpoint, and neither the sharding nor ``grad_accum_steps`` (each
    micro-batch carries its rows' global indices) changes a draw. The
    teacher's forward never drops.
    """
    has_latent = any(jax.tree.leaves(latent))
    kernel_binarizer = (config.model.get("overrides") or {}).get("kernel_binarizer") or "weight"
    ste_window = get_kernel_binarizer(kernel_binarizer).ste_window  # where the kernel's gradient passes
    distill = teacher_graphdef is not None
    d = config.distill
    drop = (config.model.get("drop_path_rate", 0.0) or 0.0) > 0

    def loss_fn(p, stats, batch, tparams, step):
        model = nnx.merge(graphdef, p, stats)
        keys = drop_path_keys(config.seed, step, batch["row"]) if drop else None
        logits = model(batch["image"], drop_path_keys=keys)
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        label_loss = cross_entropy(logits, batch["label"])
        parts = {"label_loss": label_loss, "train_top1": jnp.mean(jnp.argmax(logits, -1) == batch["label_index"])}
        if not distill:
            return label_loss, (parts, new_stats)
        teacher_logits = nnx.merge(teacher_graphdef, tparams)(batch["image"])
        kd = distillation_kl(logits, teacher_logits, d.temperature)
        return d.kd_weight * kd + d.label_weight * label_loss, ({**parts, "kd_loss": kd}, new_stats)

    loss_and_grad = accumulated_value_and_grad(loss_fn, config.optimizer.grad_accum_steps, has_state=True)

    # The device half of the input pipeline: uint8 -> normalised, erased, mixed, soft targets (keyed by the step).
    prep = input_pipeline.DevicePreprocess.from_config(config.data, config.model.num_classes, config.seed)

    def train_step(state, batch, tparams):
        batch = prep(batch, prep.key(state["step"]))
        if drop:  # each example's index in the global batch keys its drop path draws
            batch = {**batch, "row": jnp.arange(batch["image"].shape[0], dtype=jnp.int32)}
        p, stats = state["params"], batch_stats_of(state)
        (loss, parts), grads, new_stats = loss_and_grad(p, stats, batch, tparams, state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], p)
        new_p = optax.apply_updates(p, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if "batch_stats" in state:  # a running average gone non-finite would poison eval and export silently
            finite &= jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(new_stats)]))
        # A non-finite step leaves params and optimizer untouched; the host stops the run.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_p, opt_state = keep(new_p, p), keep(opt_state, state["opt_state"])
        new_stats = keep(new_stats, stats)
        osc, weight_stats = state["oscillation"], {}
        if has_latent:  # sign flips of this step; EMA oscillation frequency per weight
            counting = state["step"] >= flips_from  # never-flipped counts flips from the end of the warm-up
            osc, osc_metrics = diagnostics.oscillation_update(osc, new_p, latent, count_flips=counting)
            weight_stats = {
                **diagnostics.flip_rate(p, new_p, latent),
                **osc_metrics,
                **diagnostics.outside_ste_window_share(new_p, latent, ste_window),
            }
            weight_stats = {k: v for k, v in weight_stats.items() if k.endswith("/all")}
        metrics = {
            "loss": loss,
            **parts,
            "nonfinite": (~finite).astype(jnp.int32),
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_p),
            "lr": applied_learning_rate(opt_state),
            **weight_stats,
        }
        if (frozen := frozen_share(opt_state)) is not None:  # iterative freezing in the chain
            metrics["frozen_share/all"] = frozen
        new_state = {"step": state["step"] + 1, "params": new_p, "opt_state": opt_state, "oscillation": osc}
        if "batch_stats" in state:
            new_state["batch_stats"] = new_stats
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------- train
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the final eval metrics.

    ``workdir``: a local folder or a cloud URL (``gs://bucket/run``); on
    several processes one folder that every process sees
    (:func:`bvit_jax.runs.storage.check_shared`).
    """
    workdir = storage.as_path(workdir)
    pid, nproc = jax.process_index(), jax.process_count()

    # -- mesh -----------------------------------------------------------------
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    validate_config(config, mesh.size, nproc)

    # -- input ----------------------------------------------------------------
    # Every shard of the splits this run reads exists, opens and holds its records (footers only).
    input_pipeline.verify_data(config.data)
    info = input_pipeline.dataset_info(config.data)
    if info.num_classes != config.model.num_classes:
        raise ConfigError(
            f"dataset {config.data.name} has {info.num_classes} classes but "
            f"config.model.num_classes={config.model.num_classes}"
        )
    local_batch = config.global_batch_size // nproc

    def make_train_iter(start_step: int = 0):
        """This process's train batches from ``start_step`` on (batch k: a function of seed, process, k)."""
        return input_pipeline.create_train_iterator(
            config.data,
            local_batch_size=local_batch,
            seed=config.seed,
            process_index=pid,
            process_count=nproc,
            start_step=start_step,
        )

    train_iter = make_train_iter()
    steps_per_epoch = info.num_train / config.global_batch_size
    total_steps = steps_from(config, "total", steps_per_epoch)

    # -- model ----------------------------------------------------------------
    # Built for inference (BatchNorms use running averages): the eval graph; the train step
    # runs the training view (batch statistics) of the same variables.
    model = build_model(config, seed=config.seed)
    log.info("compute dtype %s (config.model.dtype=%r)", compute_dtype(config.model.dtype), config.model.dtype)
    graphdef, params, batch_stats = split_for_training(model)
    eval_graphdef = nnx.graphdef(model)
    latent = latent_weight_mask(model, params)
    has_latent = any(jax.tree.leaves(latent))  # False for the fp preset
    distill = bool(config.distill.enabled)
    min_size = config.mesh.get("fsdp_min_size", 2**14)

    def place(tree):
        """The run's sharding of every array of ``tree`` (FSDP rule by shape)."""
        return sharding.tree_shardings(mesh, tree, min_size)

    teacher_graphdef, teacher_params = load_teacher(config, placement=place) if distill else (None, None)
    student_macs = summary(model).macs  # per image, for MFU
    teacher_macs = summary(nnx.merge(teacher_graphdef, teacher_params)).macs if distill else 0

    def apply(variables, images, capture=False):
        """The eval forward; ``variables = (params, batch_stats)``."""
        return nnx.merge(eval_graphdef, *variables)(images, capture=capture)

    def variables_of(state):
        return state["params"], batch_stats_of(state)

    # -- optimizer ------------------------------------------------------------
    tx = build_optimizer(
        config,
        params,
        latent,
        total_steps=total_steps,
        warmup_steps=steps_from(config, "warmup", steps_per_epoch),
        grs_warmup_steps=steps_from(config.grs, "warmup", steps_per_epoch),
        grs_ramp_start_steps=steps_from(config.grs, "ramp_start", steps_per_epoch),
        grs_ramp_steps=steps_from(config.grs, "ramp", steps_per_epoch),
    )

    # -- train state and shardings -----------------------------------------------
    def init_state(p, stats):
        return init_train_state(p, tx, latent, stats)

    state_shardings = place(jax.eval_shape(init_state, params, batch_stats))
    state = jax.jit(init_state, out_shardings=state_shardings)(params, batch_stats)
    repl = sharding.replicated(mesh)
    del model, params, batch_stats

    # -- step functions -----------------------------------------------------------
    train_step = make_train_step(
        config,
        graphdef,
        latent,
        tx,
        teacher_graphdef if distill else None,
        flips_from=steps_from(config, "warmup", steps_per_epoch),
    )

    prep = input_pipeline.DevicePreprocess.from_config(config.data, config.model.num_classes, config.seed)

    def eval_step(variables, batch):
        batch = prep(batch)  # uint8 -> normalised, zeros where masked
        logits = apply(variables, batch["image"])
        mask = batch["mask"].astype(jnp.float32)
        labels = batch["label"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
            "top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
            "loss": jnp.sum(nll * mask),
            "count": jnp.sum(mask),
        }

    def diag_step(state, batch):
        """Per-layer oscillation and activation-information diagnostics (binary presets)."""
        p = state["params"]
        batch = prep(batch, prep.key(state["step"] - 1))  # the images the step that made `state` trained on
        _, captured = apply(variables_of(state), batch["image"], capture=True)
        osc = state["oscillation"]
        osc_freq = {f"osc_freq/{k}": jnp.mean(f) for k, f in osc.freq.items()}
        never = {f"never_flipped/{k}": jnp.mean((~f).astype(jnp.float32)) for k, f in osc.flipped_since.items()}
        silent = {
            f"silent/{k}": jnp.mean((e < diagnostics.SILENT_THRESHOLD).astype(jnp.float32))
            for k, e in osc.flip_ema.items()
        }
        return {
            **diagnostics.activation_metrics(captured),
            **osc_freq,
            **never,
            **silent,
            **diagnostics.near_zero_share(p, latent),
            **diagnostics.bimodality(p, latent),
        }

    teacher_sh = place(teacher_params) if distill else None
    batch_sh = sharding.batch_sharding(mesh)
    p_train_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sh, teacher_sh),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )
    p_eval_step = jax.jit(eval_step, in_shardings=(variables_of(state_shardings), batch_sh), out_shardings=repl)
    p_diag_step = jax.jit(diag_step, in_shardings=(state_shardings, batch_sh), out_shardings=repl)

    eval_passes = input_pipeline.EvalPasses(  # one eval iterator for the run: its workers start once
        config.data, local_batch_size=config.eval_batch_size // nproc, process_index=pid, process_count=nproc
    )

    def evaluate_now() -> dict[str, float]:
        return evaluate(p_eval_step, variables_of(state), config, mesh, pid, nproc, eval_passes)

    # -- restore --------------------------------------------------------------------
    cfg_dict = config_dict(config)
    workdir.mkdir(parents=True, exist_ok=True)
    storage.check_shared(workdir)  # several processes: one folder all of them see, or stop now
    store = CheckpointStore(workdir, keep=config.keep_checkpoints)
    data_resume = config.get("data_resume", "exact")
    try:
        restored = store.restore(state, train_iter, cfg_dict, data_resume=data_resume)
    except BaseException:
        store.close()
        raise
    if restored is not None:
        start, state = restored
        log.info("Resumed from %s at step %d.", workdir / "checkpoints", start)
        if data_resume == "from_step":  # the input order of this process count, from the restored step on
            train_iter = make_train_iter(start)
    if pid == 0:  # after the restore: a refused resume leaves the run's config.json as it was
        write_config(workdir, config)
    start = int(jax.device_get(state["step"]))
    writer = MetricWriter(workdir, total_steps=total_steps, start_step=start, active=pid == 0)
    flops_per_step = train_flops_per_image(student_macs, teacher_macs) * config.global_batch_size
    peak = peak_flops(jax.devices()[0].device_kind)
    profile = Profile(workdir, config, start, active=pid == 0)

    # -- loop ------------------------------------------------------------------------
    preemption = PreemptionWatch()
    pending: list[dict] = []
    eval_metrics: dict[str, float] = {}
    timer = StepTimer()  # step time and input wait, evaluation / checkpoints / compilation excluded
    step = start
    try:
        while step < total_steps:
            profile.before_step(step)
            local = timer.next_batch(train_iter)
            if step + 1 == config.get("inject_nan_at_step", -1):  # fault injection for tests
                local = {**local, "image": local["image"] * np.float32("nan")}
            batch = sharding.global_batch(local, mesh)
            state, metrics = p_train_step(state, batch, teacher_params)
            step += 1
            pending.append(metrics)

            last = step == total_steps
            log_now = step % config.log_every_steps == 0 or last
            if step == start + 1 and not log_now:
                jax.block_until_ready(metrics)
                timer.restart()  # the first step compiled: the step times start after it
            if log_now:
                rows = jax.device_get(pending)
                pending = []
                _stop_if_nonfinite(rows, step, store)
                times = timer.report()
                # Means over the steps since the last log (lr: its current value).
                row = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1] if k != "nonfinite"}
                row["lr"] = float(rows[-1]["lr"])
                speed = {**times, "img_per_s": config.global_batch_size / max(times["step_time_s"], 1e-9)}
                speed["eta_s"] = (total_steps - step) * times["step_time_s"]
                if peak is not None:
                    speed["mfu"] = flops_per_step / max(times["step_time_s"], 1e-9) / (peak * mesh.size)
                writer.write(
                    step,
                    "train",
                    {**row, **speed, "data_skipped": input_pipeline.data_stats().get("train_skipped", 0)},
                )
            writer.advance(step)
            with timer.excluded():
                profile.after_step(step, metrics)
                if (
                    has_latent
                    and config.diagnostics_every_steps
                    and (step % config.diagnostics_every_steps == 0 or last)
                ):
                    writer.write(step, "diagnostics", jax.device_get(p_diag_step(state, batch)))
                if (config.eval_every_steps and step % config.eval_every_steps == 0) or last:
                    eval_metrics = evaluate_now()
                    writer.write(step, "eval", eval_metrics)
                    best = model_variables(nnx.merge(eval_graphdef, *variables_of(state)))  # params + running stats
                    store.save_best(step, best, eval_metrics["top1"])
            stop = preemption.reached(step)
            if step % config.checkpoint_every_steps == 0 or last or stop:
                with timer.excluded():
                    _stop_if_nonfinite(jax.device_get(pending), step, store)
                    store.save(step, state, train_iter, cfg_dict)
            if stop:
                log.warning(
                    "Preemption notice (SIGTERM) received: every process saved a checkpoint at step %d "
                    "and stops. Run again to resume.",
                    step,
                )
                break
        if not eval_metrics:  # resumed a finished run: report its final accuracy again
            eval_metrics = evaluate_now()
    finally:
        profile.close()
        preemption.close()
        writer.close()
        store.close()
    return eval_metrics


def _stop_if_nonfinite(rows: list[dict], step: int, store: CheckpointStore) -> None:
    """Stop the run on a NaN/Inf loss, before anything is written from it."""
    if any(int(r["nonfinite"]) for r in rows):
        store.close()
        good = store.latest_step()
        raise NonFiniteLossError(
            f"Non-finite loss, gradient or BatchNorm statistics at or before step {step}; "
            "the run stopped without saving it. "
            f"The last good checkpoint is step {good} in {store.latest.directory}. Lower the learning rate "
            "(config.optimizer.base_lr), enable clipping (config.optimizer.clip_norm) or check the input data, "
            "then rerun to resume from that checkpoint."
        )


def evaluate(p_eval_step, variables, config, mesh, pid: int, nproc: int, passes=None) -> dict[str, float]:
    """Top-1 / top-5 / loss over the full eval split: padded batches, masked, each example once.

    ``p_eval_step(variables, batch)`` returns the batch's sums of a host
    batch (``uint8`` images, normalised on the device); ``variables`` is
    whatever it needs of the model (the trainer passes ``(params,
    batch_stats)``). ``passes``: the run's ``data.EvalPasses`` (one pass of
    it per call, its workers started once); None builds one for this call.
    """
    totals = None
    if passes is None:
        passes = input_pipeline.EvalPasses(
            config.data, local_batch_size=config.eval_batch_size // nproc, process_index=pid, process_count=nproc
        )
    for local in passes.one_pass():
        out = p_eval_step(variables, sharding.global_batch(local, mesh))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = float(totals["count"])
    return {
        "top1": float(totals["top1"]) / n,
        "top5": float(totals["top5"]) / n,
        "loss": float(totals["loss"]) / n,
        "examples": n,
    }


# ----------------------------------------------------------------------------- command line
def packaged_config(value: str) -> str:
    """``--config`` value with a bare file name of the installed configs resolved to its path.

    ``fashion_mnist.py:binaryvit`` (no folder, no such file here) becomes
    ``<site-packages>/bvit_jax/configs/fashion_mnist.py:binaryvit``: the
    repository's ``configs/`` installs as ``bvit_jax.configs``, so pip and
    Colab users name them without a checkout. Any other value is returned as
    it is (a path to a config file of one's own, or a file of that name here).
    """
    import importlib.resources

    path, sep, rest = value.partition(":")
    if os.path.dirname(path) or os.path.exists(path) or not path.endswith(".py"):
        return value
    packaged = importlib.resources.files("bvit_jax.configs") / path
    return f"{packaged}{sep}{rest}" if packaged.is_file() else value


def _define_flags(fv, argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    argv[:] = [f"--config={packaged_config(a[9:])}" if a.startswith("--config=") else a for a in argv]
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file: a path (configs/imagenet_deit.py:deit_small,binaryvit) or the name of an installed "
        "config (imagenet_deit.py:deit_small,binaryvit, from bvit_jax.configs)",
        flag_values=fv,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.", flag_values=fv)
    flags.DEFINE_bool(
        "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU, SLURM).", flag_values=fv
    )
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def _run(fv, args: list[str]) -> int:
    if args:
        raise ConfigError(f"unexpected arguments {args}: every setting is a flag (--config.FIELD=VALUE)")
    if fv["coordinator_address"].value:
        # CPU processes need a collectives backend (gloo over TCP); harmless on GPU/TPU.
        # Must be set before the backend initialises.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(fv["coordinator_address"].value, fv["num_processes"].value, fv["process_id"].value)
    elif fv["distributed"].value:
        jax.distributed.initialize()
    config = fv["config"].value
    if jax.process_index() == 0:
        print_summary(build_model(config))
    result = train_and_evaluate(config, fv["workdir"].value)
    if jax.process_index() == 0 and result:
        print(
            f"final eval: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  ({int(result['examples'])} examples)"
        )
    return 0


main = cli.command(
    "bvit-train",
    """Train a (binary) ViT from an ml_collections config.

    bvit-train --config=configs/fashion_mnist.py:binaryvit --workdir=workdirs/fmnist \\
        --config.distill.teacher_workdir=workdirs/fmnist_fp --config.optimizer.base_lr=1e-3

Multi-process (TPU pods, GPU clusters): run one copy per host with
--distributed (TPU, SLURM: peers found automatically) or with
--coordinator_address, --num_processes and --process_id. Rerunning with the
same workdir resumes from its latest checkpoint.""",
    _define_flags,
    _run,
)
