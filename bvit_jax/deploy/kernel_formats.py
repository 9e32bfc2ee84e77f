"""How a binarized kernel is stored in a ``.bvit`` file, chosen by its binarizer's packing.

Export does not know the binarizer classes: it asks each latent kernel's
binarizer for its :class:`bvit_jax.nn.binarize.Packing` and stores the kernel
in the :class:`KernelFormat` registered for that packing
(:data:`KERNEL_FORMATS`); loading checks a file against the same formats. A
binarizer whose packing has no format is refused with its layer and packing
named (:func:`kernel_format`), instead of being written as signs it does not
compute. Adding a stored form (say ternary: two bit planes and a scale) is a
:class:`KernelFormat` subclass and one entry in :data:`KERNEL_FORMATS`; the
packed forward then needs its matmul (:mod:`bvit_jax.deploy.packed`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from bvit_jax.deploy.bitops import num_words, pack_signs
from bvit_jax.nn.binarize import PM1, Binarizer, Packing

__all__ = ["KernelFormat", "SignKernel", "KERNEL_FORMATS", "kernel_format"]

TensorSpec = tuple[str, tuple[int, ...], int | None]
"""``(dtype, shape, bits)`` of one stored tensor; ``bits``: the packed axis' length, None for float tensors."""


class KernelFormat:
    """The stored tensors of one binarized ``(in, out)`` kernel ``P/kernel``, named ``P/<suffix>``."""

    def tensors(self, n_in: int, n_out: int) -> dict[str, TensorSpec]:
        """``{suffix: (dtype, shape, bits)}`` this format stores for an ``(n_in, n_out)`` kernel."""
        raise NotImplementedError

    def pack(self, kernel: np.ndarray, binarizer: Binarizer) -> dict[str, np.ndarray]:
        """``{suffix: array}``: the latent float ``kernel`` as stored, by the values ``binarizer`` computes."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SignKernel(KernelFormat):
    """+-1 kernels (``alpha * sign(W)``): ``kernel_bits`` and ``alpha``.

    ``kernel_bits``: the signs, 1 bit each, ``uint32`` words packed along the
    input axis, ``(ceil(in/32), out)`` (:func:`bvit_jax.deploy.bitops.pack_signs`,
    ``bit = [W >= 0]``); ``alpha``: the per-output-channel scale, float32
    ``(out,)``, computed by the binarizer itself (``mean_in|W|`` with XLA's
    float32 reduction, the training forward's value: a few ulp matter at the
    sign thresholds of later layers; packing scale ``'channel_mean_abs'``),
    ones for a binarizer without a scale.
    """

    def tensors(self, n_in: int, n_out: int) -> dict[str, TensorSpec]:
        return {"kernel_bits": ("uint32", (num_words(n_in), n_out), n_in), "alpha": ("float32", (n_out,), None)}

    def pack(self, kernel: np.ndarray, binarizer: Any) -> dict[str, np.ndarray]:
        if binarizer.packing.scale == "channel_mean_abs":
            alpha = np.asarray(binarizer.alpha(jnp.asarray(kernel)), dtype=np.float32)
        else:
            alpha = np.ones(kernel.shape[-1:], np.float32)
        return {"kernel_bits": pack_signs(kernel, axis=0), "alpha": alpha}


KERNEL_FORMATS: dict[Packing, KernelFormat] = {
    Packing(PM1, scale="channel_mean_abs"): SignKernel(),
    Packing(PM1): SignKernel(),
}
"""The stored form of a kernel, by its binarizer's packing."""


def kernel_format(binarizer: Binarizer, path: str = "") -> KernelFormat:
    """The :class:`KernelFormat` of ``binarizer``'s packing; ``ValueError`` naming ``path`` if there is none."""
    try:
        return KERNEL_FORMATS[binarizer.packing]
    except KeyError:
        raise ValueError(
            f"cannot export the binarized kernel {path or '?'}: its binarizer {type(binarizer).__name__} "
            f"packs as {binarizer.packing}, which the .bvit format has no stored form for "
            f"(known: {sorted(map(str, KERNEL_FORMATS))}; add a KernelFormat in bvit_jax/deploy/kernel_formats.py)"
        ) from None
