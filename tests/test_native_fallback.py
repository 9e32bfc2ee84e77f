"""The packed forward where the native library cannot be built: it runs on its XLA path and says why, once."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.train_helpers import ROOT

_NO_COMPILER_SCRIPT = r"""
import dataclasses, logging
import numpy as np
from flax import nnx
from bvit_jax.deploy import native
from bvit_jax.deploy.export import pack_model
from bvit_jax.deploy.packed import packed_forward
from bvit_jax.nn.models import VisionTransformer, get_preset, get_variant
from tests.packed_helpers import model_forward, random_images

logging.basicConfig(level=logging.WARNING)
print("available:", native.available(), native.available())
print("error:", native.load_error())
cfg = dataclasses.replace(get_variant("vit_nano"), image_size=24, embed_dim=36, num_heads=3, depth=1)
model = VisionTransformer(cfg, get_preset("binaryvit").options, rngs=nnx.Rngs(0))
packed, x = pack_model(model), random_images(cfg, b=2)
print("auto equals the model:", np.array_equal(np.asarray(packed_forward(packed, x)), model_forward(model, x)))
try:
    packed_forward(packed, x, backend="native")
except RuntimeError as e:
    print("native:", e)
"""


def test_without_a_compiler_the_packed_forward_runs_on_xla_and_says_why_once(tmp_path):
    """An install where the library cannot be built (no C++ compiler on the PATH, no current library for this
    compiler in the package or the cache): one warning, ``available()`` False, the default packed forward on its
    XLA path equal to the model, and ``backend='native'`` refused with the reason. Runs whether or not the
    library is built here (a subprocess with a PATH that holds only Python)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(
        PATH=str(bin_dir),
        BVIT_NATIVE_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    out = subprocess.run(
        [sys.executable, "-c", _NO_COMPILER_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "available: False False" in out.stdout
    assert "error: no C++ compiler found" in out.stdout
    assert "auto equals the model: True" in out.stdout
    assert "native: backend='native': the native library is unavailable (no C++ compiler found" in out.stdout
    assert out.stderr.count("native kernels unavailable, the packed forward uses its XLA path") == 1, out.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))
