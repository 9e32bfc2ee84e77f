"""Parameter groups by path, in the spirit of big_vision's regex masks.

Parameters are handled as nested pure dicts (``nnx.to_pure_dict``), whose
paths read like ``"blocks/3/mlp/fc1/linear/kernel"``. These helpers build the
boolean masks that GRS, weight decay and the diagnostics use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import jax
from flax import nnx

__all__ = [
    "path_str",
    "flatten_with_paths",
    "path_mask",
    "latent_weight_binarizers",
    "latent_weight_paths",
    "latent_weight_mask",
]


def path_str(keypath) -> str:
    """``(DictKey('blocks'), DictKey(0), ...)`` -> ``"blocks/0/..."``."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten_with_paths(tree) -> list[tuple[str, Any]]:
    """``[(path_string, leaf), ...]`` in tree-flatten order."""
    return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def path_mask(tree, include: str | Iterable[str], exclude: str | Iterable[str] = ()) -> Any:
    """Boolean tree: True where the leaf's path matches any ``include`` regex
    (``re.search``) and no ``exclude`` regex."""
    inc = [include] if isinstance(include, str) else list(include)
    exc = [exclude] if isinstance(exclude, str) else list(exclude)

    def keep(p, _):
        s = path_str(p)
        return any(re.search(r, s) for r in inc) and not any(re.search(r, s) for r in exc)

    return jax.tree_util.tree_map_with_path(keep, tree)


def latent_weight_binarizers(model: nnx.Module) -> dict[str, Any]:
    """``{path: binarizer}`` of the latent (float) parameters that the forward binarizes.

    Each layer names its own with their binarizers (``latent_weights()``,
    e.g. :meth:`bvit_jax.nn.linear.BinaryLinear.latent_weights`); a module
    without that method has none.
    """
    out = {}
    for path, module in nnx.iter_modules(model):
        for name, binarizer in module.latent_weights().items() if hasattr(module, "latent_weights") else ():
            out["/".join(str(p) for p in (*path, name))] = binarizer
    return out


def latent_weight_paths(model: nnx.Module) -> set[str]:
    """Paths of the latent (float) parameters that the forward binarizes (:func:`latent_weight_binarizers`)."""
    return set(latent_weight_binarizers(model))


def latent_weight_mask(model: nnx.Module, params) -> Any:
    """Boolean tree over ``params`` (pure dict): True on latent binary kernels.

    Used to apply GRS only to latent binary weights and to exempt them from
    weight decay (decay pulls them onto the sign boundary).
    """
    paths = latent_weight_paths(model)
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p) in paths, params)
