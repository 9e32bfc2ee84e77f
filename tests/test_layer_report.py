"""Layer reports: the contract between the layers and the summary / the latent-weight mask.

The summary adds up what each module reports and knows no layer class; these
tests check the contract on modules the library does not know.
"""

import jax.numpy as jnp
import pytest
from flax import nnx

from bvit_jax.nn import summary as S
from bvit_jax.nn.binarize import WeightBinarizer
from bvit_jax.nn.layer_report import LayerReport, ParamReport
from bvit_jax.nn.models import create
from bvit_jax.nn.param_groups import latent_weight_paths


def test_param_report_is_validated():
    assert ParamReport(1, "binary_kernel").bits == 1
    with pytest.raises(ValueError, match="1 or 32 bits"):
        ParamReport(8, "binary_kernel")
    with pytest.raises(ValueError, match="unknown parameter category"):
        ParamReport(32, "kernels")


class _Plain(nnx.Module):
    """A module that does not report itself: 2 x 3 parameters."""

    def __init__(self):
        self.w = nnx.Param(jnp.zeros((2, 3)))


class _OneBit(nnx.Module):
    """A module that reports a 1-bit latent parameter of its own (40 values) and 1000 binary MACs per token."""

    def __init__(self):
        self.bits = nnx.Param(jnp.zeros((8, 5)))

    def latent_weights(self):
        return {"bits": WeightBinarizer()}

    def report(self, num_tokens):
        return LayerReport("OneBit", {"bits": ParamReport(1, "binary_kernel")}, binary_macs=1000 * num_tokens)


class _Misreported(_OneBit):
    def report(self, num_tokens):
        return LayerReport("Misreported", {"kernel": ParamReport(1, "binary_kernel")})


def _with(child):
    model = create("vit_nano", "baseline")
    model.extra = child
    return model


def test_the_summary_adds_what_a_new_layer_reports_and_counts_an_unreported_one_at_32_bits():
    base = S.summary(create("vit_nano", "baseline"))
    plain = S.summary(_with(_Plain()))
    assert plain.params_32bit - base.params_32bit == 6 and plain.params_1bit == base.params_1bit
    assert plain.size_bytes("full") - base.size_bytes("full") == 6 * 4
    assert plain.macs == base.macs
    (row,) = [r for r in plain.rows if r.path == "extra"]
    assert row.kind == "_Plain"
    one = S.summary(_with(_OneBit()))
    assert one.params_1bit - base.params_1bit == 40 and one.params_32bit == base.params_32bit
    assert one.size_bytes("full") - base.size_bytes("full") == 40 / 8
    assert one.binary_macs - base.binary_macs == 1000 * base.num_tokens


def test_a_report_that_misnames_the_layer_parameters_is_refused():
    with pytest.raises(ValueError, match=r"names the parameters \['kernel'\], the module owns \['bits'\]"):
        S.summary(_with(_Misreported()))


def test_the_latent_weight_paths_are_what_each_layer_names():
    model = create("vit_nano", "baseline")
    paths = latent_weight_paths(model)
    assert paths and all(p.endswith("/linear/kernel") for p in paths)
    assert latent_weight_paths(_with(_OneBit())) == paths | {"extra/bits"}
    assert latent_weight_paths(create("vit_nano", "fp")) == set()
