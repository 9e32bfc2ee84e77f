"""Train a (binary) ViT from an ml_collections config: ``python train.py --config=... --workdir=...``.

The same command as ``bvit-train`` (:func:`bvit_jax.train.trainer.main`); ``--help`` lists the flags.

    python train.py --config=configs/fashion_mnist.py:binaryvit --workdir=workdirs/fmnist \\
        --config.distill.teacher_workdir=workdirs/fmnist_fp --config.optimizer.base_lr=1e-3
"""

import sys

from bvit_jax.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
