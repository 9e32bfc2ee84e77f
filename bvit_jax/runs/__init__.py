"""The run folder: where a run's config, checkpoints and metrics live, local or in a bucket.

``storage`` makes every workdir an ``etils.epath`` path (a local folder or a
``gs://`` URL) with atomic small writes and the multi-process shared-folder
check; ``checkpoint`` is plain orbax (train state, best parameters, the data
iterator), knowing nothing of models; ``workdir`` joins the two with the
model library (build the model of a run folder, restore it, save one).
The trainer, export and the timm import all read and write run folders
through this package, so none of them depends on another.

May import: :mod:`bvit_jax.errors` and :mod:`bvit_jax.nn`; never the trainer,
the deployment path, the data pipeline or the timm import.
"""
