"""bvit_jax: fully binarized Vision Transformers (BinaryViT) in JAX / Flax NNX.

The package by job (each subpackage's docstring says what it owns and what
it may import; ``tests/test_imports.py`` checks those contracts):

* :mod:`bvit_jax.nn`: the model library (binarizers, layers, the ViT).
* :mod:`bvit_jax.data`: data sets, input pipelines, on-device preprocessing.
* :mod:`bvit_jax.runs`: the run folder (storage, checkpoints, workdirs).
* :mod:`bvit_jax.train`: the trainer, its config schema, optimizer and GRS.
* :mod:`bvit_jax.deploy`: the 1-bit export, the ``.bvit`` format, the packed forward.
* :mod:`bvit_jax.interop`: weights from timm.
* :mod:`bvit_jax.cli`, :mod:`bvit_jax.errors`: command-line plumbing and the user-facing errors.
"""
