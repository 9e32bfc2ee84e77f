"""DeiT-T/S/B on ImageNet-1k (TFDS imagenet2012, 224 px): the variant and the preset as the argument.

Launch (variant: deit_tiny, deit_small, deit_base; preset: fp, baseline,
baseline+grs, baseline+asm, binaryvit), positional or by name:

    bvit-train --config=configs/imagenet_deit.py:deit_small,fp --workdir=workdirs/deit_small_fp \\
        --config.data.data_dir=$TFDS_DATA_DIR
    bvit-train --config=configs/imagenet_deit.py:variant=deit_small,preset=binaryvit \\
        --workdir=workdirs/deit_small_binaryvit --config.data.data_dir=$TFDS_DATA_DIR \\
        --config.distill.teacher_workdir=workdirs/deit_small_fp

Recipe (:func:`bvit_jax.train.recipes.imagenet_deit_config`), from DeiT (Touvron et
al., ICML 2021, Table 9, and the released facebookresearch/deit main.py
defaults): AdamW, lr 5e-4 x batch/512, cosine with 5 warm-up epochs, batch
1024, 300 epochs, weight decay 0.05, label smoothing 0.1, Mixup/CutMix,
RandAugment, stochastic depth 0.1 for fp (``model.drop_path_rate``; DeiT's
`--drop-path 0.1` default, which its README's DeiT-Ti, -S and -B training
commands keep). Binary presets distil from the fp teacher (KL on logits),
never decay latent weights and train without stochastic depth (this
project's choice, unvalidated at ImageNet scale); GRS presets use lambda
1e-4 (``grs.strength``), also unvalidated at ImageNet scale: the project's
Fashion-MNIST validation found 1e-4 too strong there and chose 1e-5
(docs/results.md), so treat lambda as a field to tune on a held-out split.

Expected, as published (not run here: no ImageNet on these machines): fp
DeiT-Ti 72.2, DeiT-S 79.8, DeiT-B 81.8 % top-1 (Touvron et al. 2021). For the
binary presets nothing is measured or published: the BinaryViT abstract
(Xiao et al. 2023) reports only "a usable level" for binaryvit.
"""

from bvit_jax.nn.models import PRESETS, VARIANTS
from bvit_jax.train.recipes import imagenet_deit_config

DEIT_VARIANTS = sorted(v for v in VARIANTS if v.startswith("deit_"))


def parse_arg(arg: str) -> tuple[str, str]:
    """``(variant, preset)`` of ``'VARIANT,PRESET'`` or ``'variant=VARIANT,preset=PRESET'`` (either order)."""
    usage = (
        f"configs/imagenet_deit.py takes 'VARIANT,PRESET' or 'variant=VARIANT,preset=PRESET' with VARIANT in "
        f"{DEIT_VARIANTS} and PRESET in {sorted(PRESETS)}, got {arg!r}"
    )
    parts = [p.strip() for p in arg.split(",")]
    if len(parts) != 2:
        raise ValueError(usage)
    if all("=" in p for p in parts):
        fields = dict(p.split("=", 1) for p in parts)
        if set(fields) != {"variant", "preset"}:
            raise ValueError(usage)
        variant, preset = fields["variant"], fields["preset"]
    elif any("=" in p for p in parts):
        raise ValueError(usage)
    else:
        variant, preset = parts
    if variant not in DEIT_VARIANTS or preset not in PRESETS:
        raise ValueError(usage)
    return variant, preset


def get_config(arg: str = "deit_small,binaryvit"):
    """The ImageNet DeiT config of ``arg`` (see :func:`parse_arg`)."""
    return imagenet_deit_config(*parse_arg(arg))
