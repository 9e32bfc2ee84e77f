"""The training recipe as an ml_collections config: every field, documented once.

The files under ``configs/`` start from these functions and change what
their run needs; they import only the installed library, so a config file
works from any directory (``bvit-train --config=path/to/config.py:PRESET``).

Durations are given in epochs (``*_epochs``) or steps (``*_steps``, wins when
> 0), so changing the batch size never silently changes the schedule. The
learning rate scales linearly with the batch of one optimizer update:
``lr = base_lr * global_batch_size / lr_reference_batch``.

A preset (:data:`bvit_jax.nn.models.PRESETS`) describes the model only; what a
run does on top of it (GRS, distillation from an fp teacher) is a config
field, whose default per preset comes from one table here,
:data:`PRESET_TRAINING`. The trainer reads the config alone:
``grs.strength > 0`` puts GRS in the optimizer chain, ``distill.enabled``
loads the teacher.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from bvit_jax.data import default_data_config
from bvit_jax.nn.models import PRESETS, override_fields

__all__ = [
    "GRS_STRENGTH",
    "DEIT_DROP_PATH_RATE",
    "BINARY_DROP_PATH_RATE",
    "PRESET_TRAINING",
    "PresetTraining",
    "base_config",
    "imagenet_deit_config",
    "model_overrides",
]


@dataclasses.dataclass(frozen=True)
class PresetTraining:
    """The training-side defaults of a preset: what a run adds to the preset's model."""

    grs_strength: float  # config.grs.strength; 0: no GRS
    distill: bool  # config.distill.enabled: knowledge distillation from an fp teacher


# lambda of the GRS presets. Unvalidated at ImageNet scale: this project's Fashion-MNIST validation found
# 1e-4 too strong there (it froze the signs while they still had to move; configs/fashion_mnist.py uses
# 1e-5, docs/results.md), and the BinaryViT paper does not publish its value.
GRS_STRENGTH = 1e-4

# Stochastic depth of the ImageNet recipe (config.model.drop_path_rate, the last block's rate).
# fp: DeiT's released recipe, the `--drop-path 0.1` default of facebookresearch/deit main.py that its
# README_deit.md training commands for DeiT-Ti, DeiT-S and DeiT-B use (DeiT paper, Touvron et al. 2021,
# Table 9: stochastic depth 0.1).
DEIT_DROP_PATH_RATE = 0.1
# Binary presets: this project's choice, unvalidated at ImageNet scale: no stochastic depth. A 1-bit
# student underfits where its fp teacher overfits (binary networks train to a higher loss; Bi-Real Net and
# ReActNet train without such regularisation), and its KD targets already smooth the labels.
BINARY_DROP_PATH_RATE = 0.0
_GRS_PRESETS = frozenset({"baseline+grs", "binaryvit"})  # the presets whose recipe adds GRS
if not _GRS_PRESETS <= PRESETS.keys():
    raise RuntimeError(f"GRS presets {sorted(_GRS_PRESETS - PRESETS.keys())} are not in bvit_jax.nn.models.PRESETS")

# Every preset of the library's registry: the GRS presets get GRS_STRENGTH, every binary preset distils.
PRESET_TRAINING: dict[str, PresetTraining] = {
    name: PresetTraining(grs_strength=GRS_STRENGTH if name in _GRS_PRESETS else 0.0, distill=preset.is_binary)
    for name, preset in PRESETS.items()
}


def model_overrides(**values) -> ml_collections.ConfigDict:
    """``config.model.overrides``: every architecture / binarization field, unset (None) unless in ``values``.

    One typed placeholder per field of :func:`bvit_jax.nn.models.override_fields`
    (the ``ViTConfig`` fields but num_classes / image_size / in_channels, the
    ``BinaryOptions`` fields but dtype), so that any of them can be set from
    the command line, e.g. ``--config.model.overrides.embed_dim=32``; None
    means "the variant's / preset's value". An unknown name is an error that
    lists the valid ones.
    """
    fields = override_fields()
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"Unknown model override(s) {unknown}; valid fields: {sorted(fields)}")
    o = ml_collections.ConfigDict({name: config_dict.placeholder(t) for name, t in fields.items()})
    o.update(values)
    return o


def base_config(preset: str, variant: str, dataset: str) -> ml_collections.ConfigDict:
    """Every field of a training run, with DeiT's ImageNet recipe as the defaults.

    ``preset`` (a key of :data:`bvit_jax.nn.models.PRESETS`) sets
    ``model.preset`` and, from :data:`PRESET_TRAINING`, the defaults of
    ``grs.strength`` and ``distill.enabled``.
    """
    if preset not in PRESET_TRAINING:
        raise ValueError(f"unknown preset {preset!r} after ':' in --config; choose one of {sorted(PRESETS)}")
    training = PRESET_TRAINING[preset]
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = variant
    c.model.preset = preset
    c.model.num_classes = 1000
    # Compute dtype: 'float32', 'bfloat16' (parameters stay float32) or 'auto' (bfloat16 on GPU/TPU,
    # float32 on CPU: bvit_jax.nn.precision.compute_dtype; the ImageNet recipe's default).
    c.model.dtype = "float32"
    # Stochastic depth (Huang et al. 2016): block i of L drops its residual branches per example with rate
    # drop_path_rate * i / (L - 1), in training only (docs/method.md, "Stochastic depth"). 0 turns it off.
    c.model.drop_path_rate = 0.0
    # Rematerialisation of every block in the backward pass: a key of bvit_jax.nn.models.REMAT_POLICIES
    # ('none', 'full' = nothing saved, 'dots_saveable', 'dots_with_no_batch_dims_saveable'); same gradients.
    c.model.remat_policy = "none"
    c.model.overrides = model_overrides()

    c.data = default_data_config(dataset)

    c.global_batch_size = 1024
    c.eval_batch_size = 1024
    c.total_epochs = 300.0
    c.total_steps = 0  # > 0 overrides total_epochs
    c.warmup_epochs = 5.0
    c.warmup_steps = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.base_lr = 5e-4  # at lr_reference_batch; DeiT
    c.optimizer.lr_reference_batch = 512
    c.optimizer.min_lr = 1e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.05  # never applied to latent binary weights
    c.optimizer.clip_norm = 5.0  # 0 disables
    c.optimizer.grad_accum_steps = 1  # micro-batches per update; global_batch_size stays the update's batch
    # Clip latent binary weights to [-c, c] after each update (larq's weight_clip); 0: off. A latent weight
    # past |W| = 1 gets no straight-through gradient (logged: outside_window/all).
    c.optimizer.latent_weight_clip = 0.0

    # GRS: g <- g + lambda_t * (|W| - alpha) sign(W) on latent binary weights (docs/method.md, "GRS").
    c.grs = ml_collections.ConfigDict()
    c.grs.strength = training.grs_strength  # > 0: GRS in the optimizer chain
    # lambda_t: 'constant' (strength, after the optional linear warm-up grs.warmup_*), or a ramp
    # from 0 at ramp_start over ramp: 'linear' (strength * s) or 'cosine' (strength * (1 - cos(pi s)) / 2),
    # s = clip((t - ramp_start) / ramp, 0, 1); t counts optimizer updates; or 'lr': strength * lr_t / peak lr.
    c.grs.schedule = "constant"
    c.grs.warmup_epochs = 0.0  # 'constant' only
    c.grs.warmup_steps = 0
    c.grs.ramp_start_epochs = 0.0  # 'linear' / 'cosine': lambda_t = 0 before the ramp
    c.grs.ramp_start_steps = 0
    c.grs.ramp_epochs = 0.0  # ramp length; 0: a step from 0 to strength at ramp_start
    c.grs.ramp_steps = 0
    # 'coupled': added to the gradient, before AdamW (rescaled by Adam's second moment); 'decoupled':
    # W <- W - lr_t * lambda_t * (|W| - alpha) sign(W) after AdamW, as AdamW's decay (lambda of another order).
    c.grs.coupling = "coupled"
    # ReBNN's per-channel strength (coupled only): lambda_i = shape_t * clip(p_i * max_j |g_ij|, min, max),
    # p_i the share of channel i's signs that changed in the last update, shape_t = lambda_t / strength.
    c.grs.adaptive = False
    c.grs.adaptive_min = 1e-5
    c.grs.adaptive_max = 2e-4
    # Iterative freezing (Nagel et al. 2022), independent of GRS: f <- m f + (1 - m) * flipped per latent
    # weight; once f > freeze_threshold the weight's updates are zeroed for good. 0 turns it off.
    c.grs.freeze_threshold = 0.0
    c.grs.freeze_momentum = 0.99  # m, the weight of the past (Nagel's momentum 0.01 = 1 - m)

    # Knowledge distillation from an fp teacher (on by default for the binary presets).
    c.distill = ml_collections.ConfigDict()
    c.distill.enabled = training.distill
    c.distill.teacher_workdir = ""
    c.distill.temperature = 1.0
    c.distill.kd_weight = 1.0
    c.distill.label_weight = 0.0
    # Compute dtype of the teacher's forward: "" keeps the teacher run's own model.dtype; "bfloat16"
    # halves its cost on accelerators (tensor cores); "auto" is bfloat16 on GPU/TPU, float32 on CPU
    # (as model.dtype); its parameters stay float32, its logits are float32.
    c.distill.teacher_dtype = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 2**14  # arrays smaller than this stay replicated

    c.log_every_steps = 100
    c.diagnostics_every_steps = 1000  # 0 disables
    c.eval_every_steps = 5000  # 0: only at the end
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    # Resuming: "exact" restores each process's saved input position (refused, with the fix, when the
    # process count changed); "from_step" starts the input at the restored step in the order of this
    # run's process count (batches are a function of seed, process and step): a resized pod continues.
    c.data_resume = "exact"
    # jax.profiler trace of profile_steps train steps from profile_first_step, on process 0, into
    # workdir/profile (0: off).
    c.profile_first_step = 10
    c.profile_steps = 0
    c.inject_nan_at_step = -1  # fault injection for tests
    return c


def imagenet_deit_config(variant: str, preset: str) -> ml_collections.ConfigDict:
    """DeiT-T/S/B on ImageNet-1k (TFDS ``imagenet2012``, 224 px): DeiT's recipe for ``preset``.

    Where it comes from: DeiT (Touvron et al., ICML 2021, Table 9 and the
    released facebookresearch/deit ``main.py`` defaults): AdamW, lr 5e-4 x
    batch / 512, cosine, 5 warm-up epochs, 300 epochs, weight decay 0.05,
    label smoothing 0.1, Mixup / CutMix, RandAugment, stochastic depth 0.1
    (:data:`DEIT_DROP_PATH_RATE`). Expected for ``fp`` (published, not run
    here): DeiT-Ti 72.2, DeiT-S 79.8, DeiT-B 81.8 % top-1 (Touvron et al.
    2021; the released checkpoints: 72.2 / 79.9 / 81.8, README_deit.md). Binary presets keep the recipe, without
    stochastic depth
    (:data:`BINARY_DROP_PATH_RATE`, this project's choice); the optimizer
    never decays latent binary weights, and they distil from an fp teacher
    (``distill.teacher_workdir``). Their GRS strength, :data:`GRS_STRENGTH`
    = 1e-4, is unvalidated at this scale (Fashion-MNIST validation chose
    1e-5, docs/results.md); nothing is expected of them by measurement.
    """
    c = base_config(preset, variant, "imagenet2012")
    c.model.num_classes = 1000
    c.data.image_size = 224
    c.data.num_workers = -1  # grain worker processes sized to the host (data.resolve_num_workers)
    c.model.dtype = "auto"  # bfloat16 compute on GPU/TPU, float32 on CPU (bvit_jax.nn.precision)
    c.distill.teacher_dtype = "auto"
    c.model.drop_path_rate = DEIT_DROP_PATH_RATE if preset == "fp" else BINARY_DROP_PATH_RATE
    return c
