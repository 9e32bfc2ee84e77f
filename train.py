"""Train a (binary) ViT from an ml_collections config.

    python train.py --config=configs/fashion_mnist.py:binaryvit --workdir=workdirs/fmnist \
        --config.distill.teacher_workdir=workdirs/fmnist_fp --config.optimizer.base_lr=1e-3

Multi-process (TPU pods and GPU clusters): run one copy per host; on TPU and
SLURM ``jax.distributed.initialize()`` finds its peers itself
(``--distributed``); elsewhere pass ``--coordinator_address``,
``--num_processes`` and ``--process_id``. Rerunning with the same workdir
resumes from its latest checkpoint.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_small.py:binaryvit", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    if _COORDINATOR.value:
        # CPU processes need a collectives backend (gloo over loopback/TCP);
        # harmless on GPU/TPU. Must be set before the backend initialises.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()

    from bvit_jax.summary import print_summary
    from bvit_jax.train import build_model, train_and_evaluate

    config = _CONFIG.value
    if jax.process_index() == 0:
        print_summary(build_model(config.model, config.data))
    result = train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0 and result:
        print(f"final eval: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  ({int(result['examples'])} examples)")


if __name__ == "__main__":
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/grain are chatty at INFO
    logging.getLogger("bvit_jax").setLevel(logging.INFO)
    app.run(main)
