"""Configs: every model field can be overridden from the command line and from Python.

``config.model.overrides`` holds one typed placeholder (None = not overridden)
per :func:`bvit_jax.nn.models.override_fields` entry; ``bvit_jax.runs.workdir.build_model``
passes the set ones to :func:`bvit_jax.nn.models.create`; ``configs/imagenet_deit.py``
takes its variant and preset by position or name. (The recipe, :mod:`bvit_jax.train.recipes`,
is tested in ``tests/test_recipes.py``.)
"""

import dataclasses
from pathlib import Path
from typing import ClassVar

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from bvit_jax.errors import ConfigError
from bvit_jax.nn import binarize
from bvit_jax.nn.models import PRESETS, VARIANTS, create, override_fields
from bvit_jax.runs.workdir import build_model
from bvit_jax.train import recipes
from configs import fashion_mnist, imagenet_deit

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = str(ROOT / "configs" / "fashion_mnist.py")


# One non-default value per override field, valid for configs/fashion_mnist.py:binaryvit,tiny
# (28 px, embed 32, depth 1, 2 heads). A new field must be added here (asserted below).
@dataclasses.dataclass(frozen=True)
class WeightTest(binarize.WeightBinarizer):
    name: ClassVar[str] = "weight_test"


VALUES = {
    "patch_size": 4,
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "binarize_weights": False,
    "binarize_acts": False,
    "act_binarizer": "ste",
    "kernel_binarizer": "weight_test",  # registered for the case (a WeightBinarizer subclass)
    "weight_scale": False,
    "learnable_shift": False,
    "asm": False,
    "asm_mode": "per_head",
    "linear_shortcut": False,
    "branch_norm": "affine",
    "rprelu": False,
    "rprelu_everywhere": True,
    "attention_bypass": True,
    "binary_attention": False,
    "attn_level_init": 0.125,
    "attn_level_grad_scale": True,
}


def _parse(*args: str, arg: str = "binaryvit,tiny"):
    """The config ``train.py`` would get for ``--config=configs/fashion_mnist.py:ARG ARGS...``."""
    argv = ["train.py", f"--config={CONFIG_FILE}:{arg}", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv["config"].value


def _abstract(config):
    return build_model(config, abstract=True)


def test_values_cover_every_override_field():
    assert set(VALUES) == set(override_fields())
    overrides = fashion_mnist.get_config("baseline").model.overrides
    assert set(overrides.keys()) == set(override_fields())
    assert all(overrides[k] is None for k in VALUES)  # placeholders: nothing overridden by default
    # the study's one model choice for the ASM presets (docs/results.md, "Tuning")
    overrides = fashion_mnist.get_config("binaryvit").model.overrides
    assert {k: overrides[k] for k in VALUES if overrides[k] is not None} == {"asm_mode": "per_head"}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_override_field_is_settable_from_the_command_line(name, monkeypatch):
    value = VALUES[name]
    if name == "kernel_binarizer":  # only the default is built in: a second one, for this case only
        monkeypatch.setitem(binarize.KERNEL_BINARIZERS, value, WeightTest)
    config = _parse(f"--config.model.overrides.{name}={value}")
    assert config.model.overrides[name] == value
    model = _abstract(config)
    built = getattr(model.cfg, name) if hasattr(model.cfg, name) else getattr(model.opts, name)
    assert built == value
    # the rest of the tiny config is untouched
    for k, v in {"embed_dim": 32, "depth": 1, "num_heads": 2}.items():
        assert getattr(model.cfg, k) == (value if k == name else v), k


def test_embed_dim_from_the_command_line_builds_that_model():
    config = _parse("--config.model.overrides.embed_dim=32", "--config.model.overrides.num_heads=4", arg="binaryvit")
    model = _abstract(config)
    assert (model.cfg.embed_dim, model.cfg.num_heads, model.cfg.depth) == (32, 4, 4)  # depth: vit_micro_28_p7's
    assert model.pos_embed.shape == (1, 17, 32)  # (28 / 7)^2 patches + CLS
    config = _parse("--config.model.overrides.depth=3", "--config.model.overrides.patch_size=4", arg="fp")
    model = _abstract(config)
    assert (model.cfg.depth, model.cfg.patch_size, model.cfg.embed_dim) == (3, 4, 96)
    assert model.pos_embed.shape == (1, 50, 96)
    assert len(model.blocks) == 3


def test_tiny_config_sets_its_overrides():
    config = fashion_mnist.get_config("binaryvit,tiny")
    model = _abstract(config)
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (32, 1, 2)
    assert model.cfg.patch_size == 7 and model.opts.asm  # not overridden: variant / preset values


def test_overrides_from_python():
    config = fashion_mnist.get_config("fp")
    config.model.overrides.embed_dim = 48
    config.model.overrides.mlp_ratio = 2  # an int into a float field
    model = _abstract(config)
    assert model.cfg.embed_dim == 48 and model.cfg.mlp_ratio == 2.0
    # a plain dict replacing the placeholders (as older code and tests do) works too
    config.model.overrides = dict(embed_dim=48, depth=2, num_heads=3)
    model = _abstract(config)
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (48, 2, 3)
    # None means "not overridden" in create() as well
    assert create("vit_nano", "fp", embed_dim=None, attn_level_init=None).cfg.embed_dim == 32
    assert recipes.model_overrides(depth=5).depth == 5


def test_typo_on_the_command_line_is_an_error():
    with pytest.raises(Exception, match="embd_dim"):
        _parse("--config.model.overrides.embd_dim=32")


def test_typo_from_python_names_the_valid_fields():
    with pytest.raises(ValueError, match="embd_dim") as e:
        create("vit_nano", "fp", embd_dim=32)
    for name in ("embed_dim", "depth", "num_heads", "patch_size", "asm", "attn_level_init"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="valid fields") as e:
        recipes.model_overrides(embd_dim=32)
    assert "embed_dim" in str(e.value)
    # an unknown key reaching build_model (e.g. from an edited config.json)
    config = fashion_mnist.get_config("fp,tiny")
    with config.unlocked():
        config.model.overrides = ml_collections.ConfigDict({"embd_dim": 32})
    with pytest.raises(ConfigError, match="valid fields") as e:
        build_model(config)
    assert "embd_dim" in str(e.value) and "embed_dim" in str(e.value) and "num_heads" in str(e.value)


def test_fields_set_elsewhere_are_refused_with_their_config_field():
    config = fashion_mnist.get_config("fp,tiny")
    config.model.overrides = dict(num_classes=5)
    with pytest.raises(ConfigError, match=r"config\.model\.num_classes"):
        build_model(config)
    config.model.overrides = dict(image_size=32)
    with pytest.raises(ConfigError, match=r"config\.data\.image_size"):
        build_model(config, abstract=True)


# ----------------------------------------------------------------------------- configs/imagenet_deit.py
@pytest.mark.parametrize(
    "arg", ["deit_tiny,baseline+grs", "variant=deit_tiny,preset=baseline+grs", "preset=baseline+grs,variant=deit_tiny"]
)
def test_imagenet_deit_takes_variant_and_preset_by_position_or_by_name(arg):
    c = imagenet_deit.get_config(arg)
    assert (c.model.variant, c.model.preset) == ("deit_tiny", "baseline+grs")
    assert c.to_json() == recipes.imagenet_deit_config("deit_tiny", "baseline+grs").to_json()


def test_imagenet_deit_from_the_command_line_by_name():
    path = str(ROOT / "configs" / "imagenet_deit.py")
    argv = ["train.py", f"--config={path}:variant=deit_base,preset=fp", "--config.global_batch_size=64"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    c = fv["config"].value
    assert (c.model.variant, c.model.preset, c.global_batch_size, c.data.image_size) == ("deit_base", "fp", 64, 224)


@pytest.mark.parametrize(
    "arg",
    [
        "deit_small",
        "deit_huge,fp",
        "deit_small,bvit",
        "variant=deit_small,fp",
        "variant=deit_small,presett=fp",
        "a,b,c",
    ],
)
def test_imagenet_deit_bad_argument_lists_valid_variants_and_presets(arg):
    with pytest.raises(ValueError, match="VARIANT,PRESET") as e:
        imagenet_deit.get_config(arg)
    msg = str(e.value)
    assert repr(arg) in msg
    assert all(v in msg for v in VARIANTS if v.startswith("deit_")) and all(p in msg for p in PRESETS)
