"""``XLA_FLAGS`` of the processes the suite starts to train: train.py runs, the notebook's kernel, the
timm converter.

``--xla_force_host_platform_device_count=N``: N fake CPU devices (1 or 2 per train.py process).

``--xla_backend_optimization_level=0``: LLVM's optimisation level for the code XLA:CPU generates. These
processes train tiny models for a few steps, so their time goes into compiling, not running: at level 0
the tiny binaryvit train step compiles in 3.4 s instead of 7.5 s and runs 1.8x slower (12 ms instead of
7 ms a step; measured on this project's 2-core VM). The level changes the machine code and with it the
last bits of some results (FMA contraction and the like: after 5 steps of the tiny binaryvit, 171 of the
228 arrays of the train state differ from the default level's in their last bits), so it is used only
where a test compares runs that all use it with each other (resume bitwise, 2 processes against 1,
preemption) or checks a margin (a short run learns). Everything the pytest process computes itself,
where exactness against the default level matters (the packed forward, the kernels, gradients),
compiles at XLA's default level (``tests/conftest.py``).
"""

from __future__ import annotations

TRAINING_PROCESS_FLAGS = ("--xla_backend_optimization_level=0",)


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a training process of the suite with ``devices`` fake CPU devices."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *TRAINING_PROCESS_FLAGS))
