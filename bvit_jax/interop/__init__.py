"""Weights from other libraries: ``timm`` (``bvit-convert``, a timm / PyTorch DeiT as a run folder).

May import: :mod:`bvit_jax.nn`, :mod:`bvit_jax.runs`, the config schema
:mod:`bvit_jax.train.recipes` (the config a converted run folder records),
:mod:`bvit_jax.cli`, :mod:`bvit_jax.errors`; never the trainer or the
deployment path.
"""
