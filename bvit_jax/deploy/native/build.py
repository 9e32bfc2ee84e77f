"""Build the native kernel library (``_bvit_native.so``) from ``src/`` with g++.

Run ``python -m bvit_jax.deploy.native.build`` (``scripts/setup.sh`` does, after
the package install) to compile into the package folder; ``--out=DIR`` elsewhere,
``--force`` to rebuild. A stamp file beside the library (``_bvit_native.so.sha``)
holds :func:`source_hash`; a build whose stamp matches is skipped, so the step is
idempotent and rebuilds only when a source, the flags, the compiler or jaxlib's FFI
headers change. The library is loaded by :mod:`bvit_jax.deploy.native`, which
builds it once into a cache folder when the package folder has no current one.

Flags: ``-O3 -std=c++17 -ffp-contract=off`` (every float32 multiply and add
rounded on its own, as XLA's float32 arithmetic it must match) and no ``-march``:
the AVX2 and AVX-512 kernels carry per-function target attributes and are picked
at run time, so one library runs on any x86-64 CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["LIB_NAME", "PACKAGE_DIR", "SOURCES", "CXXFLAGS", "compiler", "source_hash", "is_current", "build"]

LIB_NAME = "_bvit_native.so"
PACKAGE_DIR = Path(__file__).resolve().parent
SOURCES = (PACKAGE_DIR / "src" / "bvit_native.cc",)
CXXFLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall")


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else ``g++`` or ``c++`` on the PATH (None: none found)."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _include_dir() -> str:
    import jax

    return jax.ffi.include_dir()


def source_hash(cxx: str | None = None) -> str:
    """sha256 of the sources, the flags, the compiler's name and the FFI header folder (jaxlib's)."""
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join(CXXFLAGS).encode())
    h.update(str(cxx or compiler()).encode())
    inc = Path(_include_dir())
    h.update(str(inc).encode())
    h.update((inc / "xla" / "ffi" / "api" / "ffi.h").read_bytes())
    return h.hexdigest()


def _stamp(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha")


def is_current(lib: Path, digest: str | None = None) -> bool:
    """Whether ``lib`` exists and its stamp equals :func:`source_hash`."""
    lib = Path(lib)
    if not lib.is_file() or not _stamp(lib).is_file():
        return False
    return _stamp(lib).read_text().strip() == (digest or source_hash())


def build(out_dir: str | os.PathLike | None = None, *, force: bool = False, quiet: bool = True) -> Path:
    """Compile ``src/`` into ``out_dir/_bvit_native.so`` (default: the package folder); returns its path.

    Skipped when the stamp is current (unless ``force``). Writes to a temporary
    file and renames it, so concurrent builds (test workers) never see a partial
    library. Raises ``RuntimeError`` with the compiler's output when there is no
    compiler or the compilation fails.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    out = Path(out_dir) if out_dir is not None else PACKAGE_DIR
    out.mkdir(parents=True, exist_ok=True)
    lib = out / LIB_NAME
    digest = source_hash(cxx)
    if not force and is_current(lib, digest):
        return lib
    fd, tmp = tempfile.mkstemp(prefix=".bvit_native.", suffix=".so", dir=out)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, "-isystem", _include_dir(), *map(str, SOURCES), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the native library failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        if not quiet and proc.stderr:
            print(proc.stderr, file=sys.stderr)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp_tmp = _stamp(lib).with_name(f".{LIB_NAME}.sha.{os.getpid()}")
    stamp_tmp.write_text(digest + "\n")
    os.replace(stamp_tmp, _stamp(lib))
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bvit_jax.deploy.native.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default: the package folder)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamp is current")
    args = parser.parse_args(argv)
    try:
        lib = build(args.out, force=args.force, quiet=False)
    except RuntimeError as e:
        print(f"bvit_jax.deploy.native.build: {e}", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
