"""The recipe (:mod:`bvit_jax.train.recipes`): the training defaults of each preset (GRS for the GRS presets,
distillation for the binary ones), and unknown presets are clear errors."""

import pytest

from bvit_jax.nn.models import PRESETS
from bvit_jax.train import recipes
from configs import fashion_mnist

GRS_PRESETS = {"baseline+grs", "binaryvit"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_recipe_gives_grs_to_the_grs_presets_and_distillation_to_the_binary_ones(preset):
    assert set(recipes.PRESET_TRAINING) == set(PRESETS)  # every preset of the registry, no other
    fmnist, imagenet = fashion_mnist.get_config(preset), recipes.imagenet_deit_config("deit_small", preset)
    assert imagenet.grs.strength == (recipes.GRS_STRENGTH if preset in GRS_PRESETS else 0.0)
    assert fmnist.grs.strength == (1e-5 if preset in GRS_PRESETS else 0.0)  # the study's validated lambda
    for c in (fmnist, imagenet):
        assert c.distill.enabled == (preset != "fp")
    # presets describe the model only: the two GRS presets build the same models as their GRS-less twins
    twin = {"baseline+grs": "baseline", "binaryvit": "baseline+asm"}.get(preset)
    if twin:
        assert PRESETS[preset].options == PRESETS[twin].options


def test_unknown_preset_lists_the_registry():
    with pytest.raises(ValueError, match="binaryvt") as e:
        recipes.base_config("binaryvt", "vit_nano", "fashion_mnist")
    assert all(name in str(e.value) for name in PRESETS)
