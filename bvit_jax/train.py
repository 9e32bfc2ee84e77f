"""``train_and_evaluate(config, workdir)``: the whole training run, top to bottom.

Sections, in order: config checks -> mesh -> input -> model (and teacher) ->
optimizer -> train state and shardings -> step functions -> restore -> loop
(log, diagnostics, eval, checkpoint, preemption). The same code runs in a
Colab cell on CPU, on one GPU, on 8 fake CPU devices and on a multi-host TPU
pod (each process feeds its own share of every global batch).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bvit_jax import cli, diagnostics, sharding
from bvit_jax import data as input_pipeline
from bvit_jax.checkpoint import CheckpointStore
from bvit_jax.errors import ConfigError, UserError
from bvit_jax.grad_accum import accumulated_value_and_grad
from bvit_jax.grs import frozen_share
from bvit_jax.losses import cross_entropy, distillation_kl, topk_correct
from bvit_jax.metric_writers import MetricWriter
from bvit_jax.models import PRESETS, VARIANTS, model_variables, training_view
from bvit_jax.optim import GRS_SCHEDULES, applied_learning_rate, build_optimizer
from bvit_jax.param_groups import latent_weight_mask
from bvit_jax.preemption import PreemptionWatch
from bvit_jax.workdir import build_model, config_dict, has_config, restore, write_config

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
    if m.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'")
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
        if d.get("teacher_dtype", "") not in ("", "float32", "bfloat16"):
            raise ConfigError(
                f"config.distill.teacher_dtype={d.teacher_dtype!r}: use '' (the teacher run's own dtype), "
                "'float32' or 'bfloat16'"
            )


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
def load_teacher(config) -> tuple[nnx.GraphDef, Any]:
    """``(graphdef, variables)`` of the frozen KD teacher: the best model of ``config.distill.teacher_workdir``.

    Read through :func:`bvit_jax.workdir.restore` (any workdir of this
    trainer, or one :mod:`bvit_jax.convert` wrote), with the compute dtype
    ``config.distill.teacher_dtype`` (empty: the teacher run's own
    ``model.dtype``; ``'bfloat16'`` for a cheaper teacher forward on
    accelerators, float32 parameters and logits either way). The teacher must see the
    student's inputs and predict its classes: a different
    ``model.num_classes``, ``data.image_size`` or ``data.channels`` is a
    :class:`ConfigError`.
    """
    dtype = config.distill.get("teacher_dtype", "") or None
    tcfg, tmodel, tparams = restore(config.distill.teacher_workdir, which="best", dtype=dtype)
    t, s = tcfg["model"], config.model
    if t["num_classes"] != s.num_classes:
        raise ConfigError(
            f"teacher in {config.distill.teacher_workdir} has {t['num_classes']} classes, student {s.num_classes}"
        )
    for k in ("image_size", "channels"):
        if tcfg["data"][k] != config.data[k]:
            raise ConfigError(
                f"teacher was trained with data.{k}={tcfg['data'][k]}, student uses {config.data[k]}: "
                "they must see the same inputs"
            )
    return nnx.graphdef(tmodel), tparams  # the model in eval mode; tparams: all its variables


# ----------------------------------------------------------------------------- step
def split_for_training(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, params, batch_stats)`` of a model (built for inference) as the train step runs it.

    ``graphdef`` is that of :func:`bvit_jax.models.training_view` (BatchNorms
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
):
    """``train_step(state, batch, teacher_params) -> (state, metrics)``, not yet jitted.

    ``graphdef``: the model as it trains (:func:`bvit_jax.models.training_view`),
    split into ``nnx.Param`` and ``nnx.BatchStat``; a model with BatchNorm
    normalises with the statistics of each (micro-)batch and the new running
    averages go into ``state['batch_stats']``.
    One call is one optimizer update on the global batch. The loss is the label
    cross-entropy, or with a teacher (``teacher_graphdef`` not None)
    ``kd_weight * KL(teacher || student) + label_weight * CE`` from
    ``config.distill``. Its gradient is averaged over
    ``config.optimizer.grad_accum_steps`` micro-batches
    (:func:`bvit_jax.grad_accum.accumulated_value_and_grad`); then ``tx``
    (GRS -> clip -> AdamW), a non-finite guard, and the flip-rate /
    oscillation statistics when ``latent`` marks binary kernels. ``lr`` in
    the metrics is the learning rate this update applied.
    """
    has_latent = any(jax.tree.leaves(latent))
    distill = teacher_graphdef is not None
    d = config.distill

    def loss_fn(p, stats, batch, tparams):
        model = nnx.merge(graphdef, p, stats)
        logits = model(batch["image"])
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        label_loss = cross_entropy(logits, batch["label"])
        parts = {"label_loss": label_loss, "train_top1": jnp.mean(jnp.argmax(logits, -1) == batch["label_index"])}
        if not distill:
            return label_loss, (parts, new_stats)
        teacher_logits = nnx.merge(teacher_graphdef, tparams)(batch["image"])
        kd = distillation_kl(logits, teacher_logits, d.temperature)
        return d.kd_weight * kd + d.label_weight * label_loss, ({**parts, "kd_loss": kd}, new_stats)

    loss_and_grad = accumulated_value_and_grad(loss_fn, config.optimizer.grad_accum_steps, has_state=True)

    def train_step(state, batch, tparams):
        p, stats = state["params"], batch_stats_of(state)
        (loss, parts), grads, new_stats = loss_and_grad(p, stats, batch, tparams)
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
            osc, osc_metrics = diagnostics.oscillation_update(osc, new_p, latent)
            weight_stats = {**diagnostics.flip_rate(p, new_p, latent), **osc_metrics}
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
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the final eval metrics."""
    workdir = Path(workdir)
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
    train_iter = input_pipeline.create_train_iterator(
        config.data, local_batch_size=local_batch, seed=config.seed, process_index=pid, process_count=nproc
    )
    steps_per_epoch = info.num_train / config.global_batch_size
    total_steps = steps_from(config, "total", steps_per_epoch)

    # -- model ----------------------------------------------------------------
    # Built for inference (BatchNorms use running averages): the eval graph; the train step
    # runs the training view (batch statistics) of the same variables.
    model = build_model(config, seed=config.seed)
    graphdef, params, batch_stats = split_for_training(model)
    eval_graphdef = nnx.graphdef(model)
    latent = latent_weight_mask(model, params)
    has_latent = any(jax.tree.leaves(latent))  # False for the fp preset
    distill = bool(config.distill.enabled)
    teacher_graphdef, teacher_params = load_teacher(config) if distill else (None, None)

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

    min_size = config.mesh.get("fsdp_min_size", 2**14)
    state_shardings = sharding.tree_shardings(mesh, jax.eval_shape(init_state, params, batch_stats), min_size)
    state = jax.jit(init_state, out_shardings=state_shardings)(params, batch_stats)
    repl = sharding.replicated(mesh)
    if distill:
        teacher_params = jax.device_put(teacher_params, sharding.tree_shardings(mesh, teacher_params, min_size))
    del model, params, batch_stats

    # -- step functions -----------------------------------------------------------
    train_step = make_train_step(config, graphdef, latent, tx, teacher_graphdef if distill else None)

    def eval_step(variables, batch):
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
        _, captured = apply(variables_of(state), batch["image"], capture=True)
        osc_freq = {f"osc_freq/{k}": jnp.mean(f) for k, f in state["oscillation"].freq.items()}
        return {
            **diagnostics.activation_metrics(captured),
            **osc_freq,
            **diagnostics.near_zero_share(p, latent),
            **diagnostics.bimodality(p, latent),
        }

    teacher_sh = sharding.tree_shardings(mesh, teacher_params, min_size) if distill else None
    batch_sh = sharding.batch_sharding(mesh)
    p_train_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sh, teacher_sh),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )
    p_eval_step = jax.jit(eval_step, in_shardings=(variables_of(state_shardings), batch_sh), out_shardings=repl)
    p_diag_step = jax.jit(diag_step, in_shardings=(state_shardings, batch_sh), out_shardings=repl)

    def evaluate_now() -> dict[str, float]:
        return evaluate(p_eval_step, variables_of(state), config, mesh, pid, nproc)

    # -- restore --------------------------------------------------------------------
    cfg_dict = config_dict(config)
    workdir.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(workdir, keep=config.keep_checkpoints)
    try:
        restored = store.restore(state, train_iter, cfg_dict)
    except BaseException:
        store.close()
        raise
    if restored is not None:
        start, state = restored
        log.info("Resumed from %s at step %d.", workdir / "checkpoints", start)
    if pid == 0:  # after the restore: a refused resume leaves the run's config.json as it was
        write_config(workdir, config)
    start = int(jax.device_get(state["step"]))
    writer = MetricWriter(workdir, total_steps=total_steps, start_step=start, active=pid == 0)

    # -- loop ------------------------------------------------------------------------
    preemption = PreemptionWatch()
    pending: list[dict] = []
    eval_metrics: dict[str, float] = {}
    t_last, step_last = time.perf_counter(), start
    step = start
    try:
        while step < total_steps:
            local = next(train_iter)
            if step + 1 == config.get("inject_nan_at_step", -1):  # fault injection for tests
                local = {**local, "image": local["image"] * np.float32("nan")}
            batch = sharding.global_batch(local, mesh)
            state, metrics = p_train_step(state, batch, teacher_params)
            step += 1
            pending.append(metrics)

            last = step == total_steps
            if step % config.log_every_steps == 0 or last:
                rows = jax.device_get(pending)
                pending = []
                _stop_if_nonfinite(rows, step, store)
                now = time.perf_counter()
                rate = (step - step_last) * config.global_batch_size / (now - t_last)
                t_last, step_last = now, step
                # Means over the steps since the last log (lr: its current value).
                row = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1] if k != "nonfinite"}
                row["lr"] = float(rows[-1]["lr"])
                writer.write(
                    step,
                    "train",
                    {
                        **row,
                        "img_per_s": rate,
                        "eta_s": (total_steps - step) * config.global_batch_size / rate,
                        "data_skipped": input_pipeline.data_stats().get("train_skipped", 0),
                    },
                )
            writer.advance(step)
            if has_latent and config.diagnostics_every_steps and (step % config.diagnostics_every_steps == 0 or last):
                writer.write(step, "diagnostics", jax.device_get(p_diag_step(state, batch)))
            if (config.eval_every_steps and step % config.eval_every_steps == 0) or last:
                eval_metrics = evaluate_now()
                writer.write(step, "eval", eval_metrics)
                best = model_variables(nnx.merge(eval_graphdef, *variables_of(state)))  # params + running stats
                store.save_best(step, best, eval_metrics["top1"])
            stop = preemption.reached(step)
            if step % config.checkpoint_every_steps == 0 or last or stop:
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


def evaluate(p_eval_step, variables, config, mesh, pid: int, nproc: int) -> dict[str, float]:
    """Top-1 / top-5 / loss over the full eval split: padded batches, masked, each example once.

    ``p_eval_step(variables, batch)`` returns the batch's sums; ``variables``
    is whatever it needs of the model (the trainer passes ``(params, batch_stats)``).
    """
    totals = None
    it = input_pipeline.create_eval_iterator(
        config.data, local_batch_size=config.eval_batch_size // nproc, process_index=pid, process_count=nproc
    )
    for local in it:
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
def _define_flags(fv, argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file, e.g. configs/imagenet_deit.py:deit_small,binaryvit",
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
    from bvit_jax.summary import print_summary

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
