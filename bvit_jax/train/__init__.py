"""The trainer and everything only training needs.

``trainer`` (the loop, read top to bottom, and ``bvit-train``), ``recipes``
(the config schema every ``configs/`` file starts from), ``optim`` and
``grs`` (the optax chain and the gradient regularization scheme),
``grad_accum``, ``losses``, ``sharding`` (meshes and shardings),
``preemption``, ``metric_writers``, ``diagnostics`` (flip rates, activation
statistics) and ``throughput`` (step time, MFU, the profile).

May import: :mod:`bvit_jax.nn`, :mod:`bvit_jax.runs`, :mod:`bvit_jax.data`,
:mod:`bvit_jax.cli`, :mod:`bvit_jax.errors`; never the deployment path or the
timm import. Importing the package imports none of its modules.
"""
