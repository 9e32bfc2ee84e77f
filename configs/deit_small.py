"""DeiT-Small (patch 16, 224 px) on ImageNet-1k (TFDS imagenet2012).

Launch (preset after the colon: fp, baseline, baseline+grs, baseline+asm, binaryvit):

    python train.py --config=configs/deit_small.py:fp --workdir=workdirs/deit_small_fp \
        --config.data.data_dir=$TFDS_DATA_DIR
    python train.py --config=configs/deit_small.py:binaryvit --workdir=workdirs/deit_small_binaryvit \
        --config.data.data_dir=$TFDS_DATA_DIR --config.distill.teacher_workdir=workdirs/deit_small_fp

Recipe: AdamW, lr 5e-4 x batch/512, cosine with 5 warm-up epochs, batch 1024,
300 epochs, label smoothing 0.1, Mixup/CutMix, RandAugment; binary presets
distil from the fp teacher (KL on logits) and never decay latent weights.
Expected: fp 79.8% (DeiT paper); BinaryViT reports 'a usable level' for binaryvit.
Not run here (no ImageNet on these machines).
"""

from bvit_jax.recipes import imagenet_deit_config


def get_config(preset: str = "binaryvit"):
    return imagenet_deit_config("deit_small", preset)
