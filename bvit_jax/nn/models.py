"""The ViT / DeiT family, full precision and binary, with named variants and presets.

``create("deit_small", preset="binaryvit", num_classes=1000)`` builds a model.
Variants fix the architecture (DeiT-Tiny/Small/Base at 224 px with 16 px
patches, and small CPU-sized variants); presets fix the model's binarization
switches (``docs/method.md``, "Presets"):

=============== =========================================================
``fp``          DeiT (teacher): no binarization, GELU, no extra shortcuts
``baseline``    binary weights and activations (ApproxSign, scaled weights,
                RSign shift ``beta``), RPReLU, real-valued shortcut + LN around
                every linear, binary attention; no ASM
``baseline+grs`` the ``baseline`` model (GRS is a training-side addition)
``baseline+asm`` baseline + ASM (the adaptive ``gamma`` shift)
``binaryvit``   baseline + ASM (and GRS in training)
=============== =========================================================

A preset describes the model only. What a run does on top of it (GRS, an
optimizer transformation, :mod:`bvit_jax.train.grs`; distillation from an fp
teacher) is in the run's config, whose defaults per preset come from one
table, :data:`bvit_jax.train.recipes.PRESET_TRAINING`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from bvit_jax.nn.blocks import Block, fold_example_keys
from bvit_jax.nn.layer_report import LayerReport, ParamReport
from bvit_jax.nn.linear import trunc_normal
from bvit_jax.nn.norms import LayerNorm
from bvit_jax.nn.options import BinaryOptions

__all__ = [
    "ViTConfig",
    "Preset",
    "VARIANTS",
    "PRESETS",
    "VisionTransformer",
    "abstract_model",
    "REMAT_POLICIES",
    "DROP_PATH_STREAM",
    "drop_path_rates",
    "drop_path_keys",
    "PatchEmbed",
    "Head",
    "create",
    "get_preset",
    "get_variant",
    "override_fields",
    "config_overrides",
    "from_config",
    "training_view",
    "model_variables",
]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT: image and patch size, width, depth, heads."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000

    @property
    def num_patches(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # + class token


VARIANTS: dict[str, ViTConfig] = {
    # DeiT (Touvron et al., 2021), Table 1.
    "deit_tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "deit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "deit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    # CPU-sized: 28x28 (Fashion-MNIST, MNIST) and 32x32 (CIFAR) with 4 px patches.
    "vit_micro_28": ViTConfig(
        image_size=28, patch_size=4, in_channels=1, embed_dim=96, depth=4, num_heads=3, num_classes=10
    ),
    # The same with 7 px patches (16 tokens + CLS): 3x cheaper per image, and the
    # Fashion-MNIST study regime's model (docs/results.md: fp 90 % in 30 epochs).
    "vit_micro_28_p7": ViTConfig(
        image_size=28, patch_size=7, in_channels=1, embed_dim=96, depth=4, num_heads=3, num_classes=10
    ),
    "vit_micro_32": ViTConfig(
        image_size=32, patch_size=4, in_channels=3, embed_dim=96, depth=4, num_heads=3, num_classes=10
    ),
    # For tests: compiles in seconds.
    "vit_nano": ViTConfig(
        image_size=16, patch_size=4, in_channels=3, embed_dim=32, depth=2, num_heads=2, num_classes=10
    ),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named set of binarization switches of the model (training-side switches live in the config)."""

    name: str
    options: BinaryOptions

    @property
    def is_binary(self) -> bool:
        """Whether the preset binarizes anything (every preset but ``fp``)."""
        return self.options.is_binary


_BASELINE = BinaryOptions(
    binarize_weights=True,
    binarize_acts=True,
    act_binarizer="approx",
    weight_scale=True,
    learnable_shift=True,
    asm=False,
    linear_shortcut=True,
    rprelu=True,
    binary_attention=True,
)

FP_OPTIONS = BinaryOptions()  # every switch off: DeiT (frozen, so a safe shared default)

PRESETS: dict[str, Preset] = {
    "fp": Preset("fp", FP_OPTIONS),
    "baseline": Preset("baseline", _BASELINE),
    "baseline+grs": Preset("baseline+grs", _BASELINE),  # the baseline model; GRS is in its recipe
    "baseline+asm": Preset("baseline+asm", dataclasses.replace(_BASELINE, asm=True)),
    "binaryvit": Preset("binaryvit", dataclasses.replace(_BASELINE, asm=True)),  # + GRS in its recipe
}


def get_variant(name: str) -> ViTConfig:
    """The architecture of a named variant (see ``VARIANTS``)."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model variant {name!r}; choose one of {sorted(VARIANTS)} (config field model.variant)."
        ) from None


def get_preset(name: str) -> Preset:
    """The model switches of a named preset (see ``PRESETS``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown preset {name!r}; choose one of {sorted(PRESETS)} (config field model.preset)."
        ) from None


class PatchEmbed(nnx.Conv):
    """Patch embedding: a ``p x p`` convolution with stride ``p`` (``nnx.Conv``'s parameters and values).

    Always full precision; reports ``num_patches * p * p * in_channels * dim`` MACs per image.
    """

    def __init__(self, cfg: ViTConfig, dtype: Any, *, rngs: nnx.Rngs):
        p = cfg.patch_size
        super().__init__(
            cfg.in_channels,
            cfg.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=trunc_normal,
            dtype=dtype,
            rngs=rngs,
        )
        self.num_patches = cfg.num_patches

    def report(self, num_tokens: int) -> LayerReport:
        """Kernel and bias, 32-bit, category ``'patch_embed'``; ``patches * kh * kw * in * out`` MACs."""
        kh, kw, cin, cout = self.kernel.shape
        params = {"kernel": ParamReport(32, "patch_embed"), "bias": ParamReport(32, "patch_embed")}
        return LayerReport("PatchEmbed", params, fp_macs=self.num_patches * kh * kw * cin * cout)


class Head(nnx.Linear):
    """Classifier head on the class token (``nnx.Linear``'s parameters and values); ``in * out`` MACs per image."""

    def report(self, num_tokens: int) -> LayerReport:
        """Kernel and bias, 32-bit, category ``'head'``; ``in * out`` MACs (the class token only)."""
        cin, cout = self.kernel.shape
        params = {"kernel": ParamReport(32, "head"), "bias": ParamReport(32, "head")}
        return LayerReport("Head", params, fp_macs=cin * cout)


# config.model.remat_policy -> what each block saves for the backward pass under nnx.remat
# (jax.checkpoint_policies; big_vision's ``remat_policy``). None: no remat (every activation is kept).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input: the whole block is recomputed
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep every matmul output, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # linears only
}

# The random stream of drop path: fold_in(key(seed), DROP_PATH_STREAM), apart from the input pipeline's keys.
DROP_PATH_STREAM = 0x0D0F


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop path rates, linear in depth: ``r_i = rate * i / (L - 1)`` for block ``i = 0 .. L-1``.

    Block 0 is never dropped and the last block is dropped with ``rate``: the
    linear decay rule of Huang et al. (ECCV 2016, Sec. 3, ``p_l = 1 - l/L (1 -
    p_L)`` with survival probability ``p``), as DeiT trains it (timm's
    ``torch.linspace(0, drop_path_rate, depth)``). One block (``L = 1``) gets 0.
    """
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]


def drop_path_keys(seed: int, step: jax.Array, rows: jax.Array) -> jax.Array:
    """The drop path keys of a train step, one per example: ``fold_in(fold_in(fold_in(key(seed),
    DROP_PATH_STREAM), step), row)`` for each ``row`` (the example's index in the global batch).

    A function of (seed, step, row) only: a resumed run draws what the
    uninterrupted one drew (no state in the checkpoint), and neither the
    sharding of the batch (the threefry PRNG is partitionable,
    ``jax_threefry_partitionable``) nor its split into micro-batches
    (:mod:`bvit_jax.train.grad_accum`: micro-batch ``i`` holds rows ``i::k``, with
    their global indices) changes an example's draw.
    """
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROP_PATH_STREAM), step)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, rows)


class VisionTransformer(nnx.Module):
    """ViT / DeiT classifier (Dosovitskiy et al., 2021; Touvron et al., 2021).

    ``logits = head(LN(z_L[cls]))`` with ``z_0 = [cls; patch_embed(x)] + pos``
    and ``z_l = Block(z_{l-1})``. Patch embedding, class token, position
    embedding, LayerNorms and head are always full precision; the blocks follow
    ``opts`` (:class:`bvit_jax.nn.options.BinaryOptions`).

    ``model(images)`` returns logits; ``model(images, capture=True)`` returns
    ``(logits, intermediates)`` where ``intermediates`` maps the path of every
    sign (e.g. ``"blocks/0/attn/q/linear/act"``) to ``{"x": input, "shifted":
    input minus its shift}``.

    Training-only switches (config fields ``model.drop_path_rate``,
    ``model.remat_policy``; neither changes a parameter):

    * ``drop_path_rate = r``: stochastic depth, block ``i`` drops its residual
      branches per example with rate ``drop_path_rates(r, depth)[i]``, but only
      when called with ``drop_path_keys`` (one key per example, shape ``(B,)``;
      the train step passes :func:`drop_path_keys`). Without keys (eval,
      diagnostics, export, the teacher) the forward is deterministic.
    * ``remat_policy``: a key of :data:`REMAT_POLICIES`; other than ``'none'``,
      every block's call is wrapped in ``nnx.remat`` with that policy, so the
      backward pass recomputes what the policy does not save (same values,
      less activation memory). The ``capture=True`` forward is never remat'ed.
    """

    def __init__(
        self,
        cfg: ViTConfig,
        opts: BinaryOptions = FP_OPTIONS,
        *,
        rngs: nnx.Rngs,
        drop_path_rate: float = 0.0,
        remat_policy: str = "none",
    ):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"model.remat_policy={remat_policy!r} is not one of {list(REMAT_POLICIES)} "
                "(bvit_jax.nn.models.REMAT_POLICIES)"
            )
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"model.drop_path_rate={drop_path_rate} must be in [0, 1)")
        self.cfg, self.opts = cfg, opts
        self.drop_path_rate, self.remat_policy = float(drop_path_rate), remat_policy
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg, opts.dtype, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d)))
        self.pos_embed = nnx.Param(trunc_normal(rngs.params(), (1, cfg.num_tokens, d)))
        self.blocks = nnx.List(
            [
                Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.num_tokens, opts, rngs=rngs, drop_path_rate=r)
                for r in drop_path_rates(self.drop_path_rate, cfg.depth)
            ]
        )
        # bvit_jax.nn.norms.LayerNorm (nnx.LayerNorm's parameters): the function the packed forward uses too
        self.norm = LayerNorm(d, epsilon=1e-6, dtype=opts.dtype, rngs=rngs)
        self.head = Head(d, cfg.num_classes, kernel_init=trunc_normal, dtype=opts.dtype, rngs=rngs)

    def features(
        self, images: jax.Array, *, capture: bool = False, drop_path_keys: jax.Array | None = None
    ) -> jax.Array:
        """The class-token feature after the final LayerNorm, shape ``(B, embed_dim)``.

        ``drop_path_keys`` (one key per example): block ``i`` draws its drops
        from ``fold_in(key_b, i)`` (:func:`bvit_jax.nn.blocks.drop_path`).
        """
        cfg = self.cfg
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
            raise ValueError(
                f"expected images of shape (B, {cfg.image_size}, {cfg.image_size}, {cfg.in_channels}), "
                f"got {images.shape}; set data.image_size / data.channels to match the model"
            )
        x = self.patch_embed(images.astype(self.opts.dtype))
        x = rearrange(x, "b h w d -> b (h w) d")
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        policy = REMAT_POLICIES[self.remat_policy]
        for i, block in enumerate(self.blocks):
            keys = None if drop_path_keys is None else fold_example_keys(drop_path_keys, i)
            if self.remat_policy == "none" or capture:
                x = block(x, capture=capture, keys=keys)
            else:
                x = nnx.remat(_call_block, policy=policy)(block, x, keys)
        return self.norm(x[:, 0])

    def logits(self, images: jax.Array, *, capture: bool = False, drop_path_keys: jax.Array | None = None) -> jax.Array:
        """Class logits (float32), shape ``(B, num_classes)``."""
        feats = self.features(images, capture=capture, drop_path_keys=drop_path_keys)
        return self.head(feats).astype(jnp.float32)

    def report(self, num_tokens: int) -> LayerReport:
        """The model's own parameters: class token and position embedding (32-bit, category ``'tokens'``)."""
        params = {"cls_token": ParamReport(32, "tokens"), "pos_embed": ParamReport(32, "tokens")}
        return LayerReport("VisionTransformer (cls token, pos embed)", params)

    def __call__(self, images: jax.Array, *, capture: bool = False, drop_path_keys: jax.Array | None = None):
        if not capture:
            return self.logits(images, drop_path_keys=drop_path_keys)
        logits, captured = nnx.capture(self.logits, nnx.Intermediate)(images, capture=True)
        return logits, _group_intermediates(captured)


def _call_block(block: Block, x: jax.Array, keys: jax.Array | None) -> jax.Array:
    """One block's forward, the function ``nnx.remat`` wraps."""
    return block(x, keys=keys)


def _group_intermediates(state) -> dict[str, dict[str, jax.Array]]:
    """Flatten sown ``{path: {"x": (v,), "shifted": (v,)}}`` to ``{"a/b/c": {"x": v, ...}}``."""
    out: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in nnx.to_flat_state(state):
        *module_path, name = (str(k) for k in path)
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
        out.setdefault("/".join(module_path), {})[name] = value[0] if isinstance(value, tuple) else value
    return out


# Model fields that a config sets elsewhere than ``model.overrides`` (they must agree with the data).
_SET_ELSEWHERE = {"num_classes": "model.num_classes", "image_size": "data.image_size", "in_channels": "data.channels"}


def _field_type(annotation) -> type:
    """``int`` / ``float`` / ``bool`` / ``str`` of a dataclass field annotation (``X | None`` -> ``X``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _field_type(args[0])
    if annotation in (int, float, bool, str):
        return annotation
    raise TypeError(f"no config type for a field annotated {annotation!r}")


def override_fields() -> dict[str, type]:
    """``{name: type}`` of every field settable in ``config.model.overrides``.

    All :class:`ViTConfig` fields but ``num_classes``, ``image_size`` and
    ``in_channels`` (config fields ``model.num_classes``, ``data.image_size``,
    ``data.channels``), and all :class:`BinaryOptions` fields but ``dtype``
    (``model.dtype``). ``attn_level_init: float | None`` is listed as ``float``.
    """
    out: dict[str, type] = {}
    for cls, skip in ((ViTConfig, set(_SET_ELSEWHERE)), (BinaryOptions, {"dtype"})):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                out[f.name] = _field_type(hints[f.name])
    return out


def config_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``create`` keyword arguments of a config's ``model.overrides``: the entries that are not None.

    ``None`` (an ``ml_collections`` placeholder left unset, or ``null`` in a
    saved ``config.json``) means "not overridden". Raises ``ValueError`` naming
    the valid fields for an unknown name, and the right config field for
    ``num_classes`` / ``image_size`` / ``in_channels``.
    """
    items = {} if overrides is None else {k: overrides[k] for k in overrides.keys()}
    valid = override_fields()
    misplaced = sorted(k for k, v in items.items() if k in _SET_ELSEWHERE and v is not None)
    if misplaced:
        raise ValueError(
            "config.model.overrides."
            + ", ".join(misplaced)
            + " cannot be set there: use "
            + ", ".join(f"config.{_SET_ELSEWHERE[k]}" for k in misplaced)
        )
    unknown = sorted(set(items) - set(valid) - set(_SET_ELSEWHERE))
    if unknown:
        raise ValueError(f"Unknown field(s) {unknown} in config.model.overrides; valid fields: {sorted(valid)}")
    return {k: v for k, v in items.items() if v is not None}


def from_config(config: Mapping[str, Any], *, seed: int = 0, dtype: Any = None) -> VisionTransformer:
    """The model a run config describes (an ml_collections config or the dict of a saved config.json).

    ``create(model.variant, model.preset, num_classes=model.num_classes,
    image_size=data.image_size, in_channels=data.channels,
    drop_path_rate=model.drop_path_rate, remat_policy=model.remat_policy,
    **config_overrides(model.overrides))`` (the last two 0 / ``'none'`` when
    absent, as in older runs' config.json); ``dtype`` is the compute dtype
    (None: float32, which is all that shapes and exports need).
    """
    m, d = config["model"], config["data"]
    kwargs = {} if dtype is None else {"dtype": jnp.dtype(dtype)}
    return create(
        m["variant"],
        m["preset"],
        num_classes=m["num_classes"],
        image_size=d["image_size"],
        in_channels=d["channels"],
        seed=seed,
        drop_path_rate=m.get("drop_path_rate", 0.0) or 0.0,  # absent in the config.json of older runs
        remat_policy=m.get("remat_policy", "none") or "none",
        **kwargs,
        **config_overrides(m.get("overrides")),
    )


def create(
    variant: str = "deit_small",
    preset: str = "binaryvit",
    *,
    dtype: Any = jnp.float32,
    seed: int = 0,
    drop_path_rate: float = 0.0,
    remat_policy: str = "none",
    **overrides,
) -> VisionTransformer:
    """Build a model: ``create("deit_small", preset="binaryvit", num_classes=1000)``.

    Args:
      variant: a key of ``VARIANTS`` (architecture).
      preset: a key of ``PRESETS`` (binarization switches).
      dtype: compute dtype, e.g. ``jnp.bfloat16`` (parameters stay float32).
      seed: parameter initialisation seed.
      drop_path_rate: stochastic depth of the last block (linear in depth,
        :func:`drop_path_rates`); acts only on a forward given drop path keys.
      remat_policy: a key of :data:`REMAT_POLICIES` (``'none'``: no remat).
      **overrides: any :class:`ViTConfig` field (``num_classes``, ``image_size``,
        ``in_channels``, ``embed_dim``, ``depth``, ...) or :class:`BinaryOptions`
        field (``act_binarizer="ste"``, ``asm=False``, ...). A value of ``None``
        means "not overridden" (the variant's / preset's value), as an unset
        placeholder of ``config.model.overrides`` does.

    Raises:
      ValueError: an unknown override name (the message lists the valid fields).
    """
    arch_fields = {f.name for f in dataclasses.fields(ViTConfig)}
    opt_fields = {f.name for f in dataclasses.fields(BinaryOptions)} - {"dtype"}
    unknown = set(overrides) - arch_fields - opt_fields
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if unknown:
        raise ValueError(
            f"Unknown model override(s) {sorted(unknown)}; valid architecture fields: {sorted(arch_fields)}, "
            f"binarization fields: {sorted(opt_fields)}"
        )
    cfg = dataclasses.replace(get_variant(variant), **{k: v for k, v in overrides.items() if k in arch_fields})
    _ = cfg.num_patches  # validates image/patch sizes
    opts = dataclasses.replace(
        get_preset(preset).options, dtype=jnp.dtype(dtype), **{k: v for k, v in overrides.items() if k in opt_fields}
    )
    return VisionTransformer(cfg, opts, rngs=nnx.Rngs(seed), drop_path_rate=drop_path_rate, remat_policy=remat_policy)


def abstract_model(cfg: ViTConfig, opts: BinaryOptions) -> VisionTransformer:
    """The model of ``cfg`` and ``opts`` with shapes but no values (``nnx.eval_shape``): its structure, for free.

    What the deployment path reads to learn a model's parameters and its
    layers' binarizers without building (or initialising) one.
    """
    return nnx.eval_shape(lambda: VisionTransformer(cfg, opts, rngs=nnx.Rngs(0)))


def training_view(model: nnx.Module) -> nnx.Module:
    """The model as the train step runs it: every BatchNorm normalises with batch statistics.

    Models are built for inference (a :class:`bvit_jax.nn.norms.BranchBatchNorm`
    uses its running averages, so ``model(images)`` is the eval forward);
    this returns ``nnx.view(model, use_running_average=False)``, which shares
    the model's arrays, and whose BatchNorms update their running averages
    when called. A model without BatchNorm is returned as it is.
    """
    if not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model)):
        return model
    return nnx.view(model, use_running_average=False)


def model_variables(model: nnx.Module) -> dict:
    """Everything a trained model holds, as one pure dict keyed by module path.

    The parameters (``nnx.Param``) and, with ``branch_norm='batchnorm'``, the
    running statistics (``nnx.BatchStat``: ``.../norm/mean``, ``.../norm/var``,
    beside the same module's ``scale`` and ``bias``). This is what the best
    checkpoint, :func:`bvit_jax.runs.workdir.restore` and export carry; the
    optimizer sees the parameters alone.
    """
    return nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
