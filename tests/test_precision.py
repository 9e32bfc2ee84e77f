"""Compute dtypes (:mod:`bvit_jax.nn.precision`): ``"auto"`` by backend, the recipes' defaults, the model it builds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bvit_jax.nn.precision import compute_dtype
from bvit_jax.runs.workdir import build_model
from bvit_jax.train.recipes import base_config, imagenet_deit_config


@pytest.mark.parametrize(
    ("name", "backend", "expected"),
    [
        ("auto", "cpu", "float32"),
        ("auto", "gpu", "bfloat16"),
        ("auto", "tpu", "bfloat16"),
        ("auto", "cuda", "bfloat16"),
        ("float32", "tpu", "float32"),
        ("bfloat16", "cpu", "bfloat16"),
    ],
)
def test_compute_dtype_resolves_auto_by_backend_and_passes_explicit_dtypes(name, backend, expected):
    assert compute_dtype(name, backend) == expected


def test_compute_dtype_defaults_to_this_backend_and_rejects_other_names():
    assert compute_dtype("auto") == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    for bad in ("float16", "fp32", ""):
        with pytest.raises(ValueError, match="'auto', 'float32' or 'bfloat16'"):
            compute_dtype(bad, "cpu")


def test_imagenet_recipe_is_auto_and_fashion_mnist_float32():
    c = imagenet_deit_config("deit_small", "binaryvit")
    assert (c.model.dtype, c.distill.teacher_dtype) == ("auto", "auto")
    f = base_config("binaryvit", "vit_micro_28_p7", "fashion_mnist")
    assert (f.model.dtype, f.distill.teacher_dtype) == ("float32", "")


def test_build_model_resolves_auto_for_this_backend():
    """``model.dtype='auto'`` builds the model of the resolved dtype; parameters stay float32."""
    c = imagenet_deit_config("deit_tiny", "binaryvit")
    c.model.overrides.depth = 1
    c.data.image_size = 32
    model = build_model(c, abstract=True)
    expected = jnp.dtype(compute_dtype("auto"))
    assert model.blocks[0].attn.q.linear.dtype == expected
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert build_model(c, abstract=True, dtype="bfloat16").blocks[0].attn.q.linear.dtype == jnp.bfloat16


def test_validate_config_accepts_auto_and_names_the_choices_otherwise():
    from bvit_jax.errors import ConfigError
    from bvit_jax.train.trainer import validate_config

    c = imagenet_deit_config("deit_tiny", "fp")
    validate_config(c, num_devices=8, process_count=1)  # "auto" is a valid model.dtype
    c.model.dtype = "float16"
    with pytest.raises(ConfigError, match=r"config.model.dtype='float16'.*'auto'"):
        validate_config(c, num_devices=8, process_count=1)
