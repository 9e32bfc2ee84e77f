"""What a layer reports about itself: its parameters by bit width, its MACs by precision.

Every layer of the library that owns parameters or does multiply-accumulates
has a ``report(num_tokens)`` method returning a :class:`LayerReport`;
:mod:`bvit_jax.nn.summary` walks the modules of a model and adds the reports up,
without knowing the layer classes (as larq's summary reads each layer's
quantizer precision). A module without ``report`` (a plain flax layer someone
added) is counted conservatively: its parameters at 32 bits in the category
``'other'``, no MACs.

Parameter categories (:data:`CATEGORIES`) say which size conventions of the
summary count a parameter; the bit width says its size (``1`` for a latent
kernel the forward binarizes: the 1-bit model stores only its sign).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from flax import nnx

__all__ = ["CATEGORIES", "ParamReport", "LayerReport", "float_params_report"]

CATEGORIES: dict[str, str] = {
    "binary_kernel": "a kernel the forward binarizes (1 bit per weight in the exported model)",
    "linear_kernel": "a full-precision kernel of a block linear",
    "patch_embed": "the patch embedding (kernel and bias)",
    "head": "the classifier head (kernel and bias)",
    "norm": "a LayerNorm the full-precision DeiT has too",
    "bias": "the bias of a block linear",
    "tokens": "class token and position embedding",
    "added": "what binarization adds: shifts, RPReLU, branch normalisations, the attention level",
    "other": "a parameter of a module that does not report itself",
}


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """One parameter: the bits each of its values takes in the 1-bit model, and its category."""

    bits: int
    category: str

    def __post_init__(self):
        if self.bits not in (1, 32):
            raise ValueError(f"a parameter is stored at 1 or 32 bits, got {self.bits}")
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown parameter category {self.category!r}; choose one of {sorted(CATEGORIES)}")


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """A layer's own parameters and work for one image of ``num_tokens`` tokens.

    Attributes:
      kind: a short description for the summary table (class name and precision).
      params: the layer's own parameters (not its children's), by attribute name.
      binary_macs: MACs with both operands binary (XNOR-popcount in the 1-bit model).
      fp_macs: MACs with a full-precision operand.
      attention_binary_macs: the part of ``binary_macs`` that is the two attention matmuls.
      derived_32bit: 32-bit numbers a 1-bit export stores beside the parameters
        (the per-channel weight scales ``alpha`` it precomputes).
    """

    kind: str
    params: Mapping[str, ParamReport] = dataclasses.field(default_factory=dict)
    binary_macs: int = 0
    fp_macs: int = 0
    attention_binary_macs: int = 0
    derived_32bit: int = 0


def float_params_report(module: nnx.Module, category: str) -> LayerReport:
    """A report of ``module``'s own ``nnx.Param`` attributes (not its children's): 32-bit, one category, no MACs.

    What a layer of full-precision parameters reports, and how the summary
    counts a module that does not report itself (category ``'other'``).
    """
    names = [name for name, value in vars(module).items() if isinstance(value, nnx.Param)]
    return LayerReport(type(module).__name__, {n: ParamReport(32, category) for n in names})
