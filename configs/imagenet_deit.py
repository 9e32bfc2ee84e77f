"""Shared body of the DeiT-T/S/B ImageNet configs."""

from configs import common


def imagenet_config(variant: str, preset: str):
    c = common.base_config(preset, variant, "imagenet2012")
    c.model.num_classes = 1000
    c.data.image_size = 224
    # Binary presets: DeiT recipe, but binary networks train without weight
    # decay on latent weights (handled by the optimizer mask) and with KD.
    return c
