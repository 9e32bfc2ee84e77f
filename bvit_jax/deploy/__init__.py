"""The 1-bit deployment path: from a trained run folder to a packed ``.bvit`` file and its forward.

``bitops`` (sign packing and XNOR-popcount matmuls), ``bvit_format`` (the
file format), ``packed`` (the packed forward, bit-exact with the model's eval
forward), ``export`` (``bvit-export``, the file from a run folder) and
``predict`` (``bvit-predict``).

May import: :mod:`bvit_jax.nn`, :mod:`bvit_jax.runs`, :mod:`bvit_jax.data`,
:mod:`bvit_jax.cli`, :mod:`bvit_jax.errors`; never the trainer.
"""
