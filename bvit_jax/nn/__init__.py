"""The model library: binarizers, layers and the Vision Transformer, in Flax NNX.

Owns everything a forward pass is made of: the binarizers with their
surrogate gradients (``binarize``), the fused float kernels (``fused_ops``),
the switches of a model (``options``), the layers split by job
(``activations``: shifted signs and RPReLU; ``norms``; ``folding``: a branch
normalisation as the affine map folded into its linear; ``linear``;
``attention``; ``blocks``), the model with its variants and presets
(``models``), the accounting of bits and operations (``layer_report``,
``summary``), parameter groups (``param_groups``) and compute dtypes
(``precision``).

May import: nothing of the project but :mod:`bvit_jax.errors`
(``tests/test_imports.py`` checks it).
"""
