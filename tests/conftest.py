"""Test set-up: 8 fake CPU devices (sharding tests), the repo on sys.path, shared fixtures."""

import os
import sys
from pathlib import Path

# Before JAX is imported anywhere: 8 host devices, as on an 8-chip host; XLA's default code generation,
# as users run it (the processes the trainer tests start compile faster: tests/xla_flags.py).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gs:// paths through gcsfs, the core install's client, also where the test extra installed TensorFlow
# (etils.epath would pick TF's GCS file system, which knows no emulator; epath reads this once).
os.environ.setdefault("EPATH_USE_TF", "false")

ROOT = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for both pytest workers and every train.py process the tests start
# (they inherit this environment): the suite compiles the same tiny programs many times over, in many
# processes, and a cache hit loads the same executable a fresh compile would build, so no result changes.
# A size limit turns on the cache's file lock (reads and writes of one entry never interleave across
# processes). Only compiles of 1 s or more are kept (the train and eval steps, the models): each write scans
# the whole folder under that lock (stat and access-time file of every entry, for the size limit), so
# keeping every op-by-op compile (thousands) cost more than it saved: 0.15-0.4 s of lock per write at
# ~3,800 entries, the other worker waiting.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "xla-tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from absl import logging as absl_logging  # noqa: E402

absl_logging.set_verbosity(absl_logging.WARNING)

# Fixtures shared by several test modules (the TFDS-built fake ImageNet and its damaged copies; the
# trainer's distillation teacher; a Cloud Storage emulator).
pytest_plugins = ["tests.data_fixtures", "tests.train_helpers", "tests.gcs_emulator"]


# Longest first on every worker: the modules whose tests start training processes or run the trainer for many
# steps (a minute or more each on 2 cores) go to the head of each pytest-xdist worker's share, dealt round-robin,
# and the hundreds of short tests after them. Under ``--dist worksteal`` (scripts/test.sh) a worker first gets
# one contiguous share of the collection (the scheduler splits it into equal counts, in order) and an idle worker
# steals from the tail of another's queue, so the run ends on short tests, not on one worker running a long test
# that came last while the other waits. Both workers compute the same order (a deterministic, stable sort).
SLOW_MODULES_FIRST = (
    "test_preemption.py",
    "test_multihost.py",
    "test_ablation.py",
    "test_notebook.py",
    "test_sharding.py",
    "test_convert.py",
    "test_train.py",
    "test_stochastic_depth.py",
)


def pytest_collection_modifyitems(config, items):
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    slow = sorted((it for it in items if it.path.name in rank), key=lambda it: rank[it.path.name])
    rest = [it for it in items if it.path.name not in rank]
    order, remaining = [], len(items)
    for w in range(workers):  # worksteal's first split: worker w gets the next remaining // (workers - w)
        share = remaining // (workers - w)
        head = slow[w::workers]
        take = max(share - len(head), 0)
        order += head + rest[:take]
        rest, remaining = rest[take:], remaining - share
    items[:] = order + rest
