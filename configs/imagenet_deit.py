"""DeiT-T/S/B on ImageNet-1k, the variant and preset as the argument.

    bvit-train --config=configs/imagenet_deit.py:deit_small,binaryvit --workdir=... \\
        --config.data.data_dir=$TFDS_DATA_DIR --config.distill.teacher_workdir=...

``configs/deit_{tiny,small,base}.py:PRESET`` are the same configs by name.
"""

from bvit_jax.models import VARIANTS
from bvit_jax.recipes import imagenet_deit_config


def get_config(arg: str = "deit_small,binaryvit"):
    variant, _, preset = arg.partition(",")
    deit = sorted(v for v in VARIANTS if v.startswith("deit_"))
    if variant not in deit or not preset:
        raise ValueError(f"configs/imagenet_deit.py takes 'VARIANT,PRESET' with VARIANT in {deit}, got {arg!r}")
    return imagenet_deit_config(variant, preset)
