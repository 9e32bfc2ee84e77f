#!/usr/bin/env bash
# Set up a fresh machine for one job; idempotent.
#
#   bash scripts/setup.sh          # core: train, export, predict (requirements.txt)
#   bash scripts/setup.sh test     # everything the test suite needs: core + prepare
#                                  # (TensorFlow) + interop (torch, timm) + notebook + test tools
#   bash scripts/setup.sh prepare interop ...   # core + the named extras
#
# Installs the Debian package dataset-fashion-mnist (the quick start's data)
# and a virtual environment at .venv with the pinned lock files of the job
# (pyproject.toml declares the groups; requirements*.txt pin them).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=("$@")
if [ "${#extras[@]}" -eq 1 ] && [ "${extras[0]}" = "test" ]; then
  extras=(prepare interop notebook test)
fi
locks=(requirements.txt)
for extra in "${extras[@]}"; do
  [ -f "requirements-$extra.txt" ] || { echo "setup.sh: unknown extra '$extra' (no requirements-$extra.txt)" >&2; exit 2; }
  locks+=("requirements-$extra.txt")
done

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# One stamp per lock file. When any of the job's lock files is new or changed,
# all of them go to pip in one call, so one resolution holds every pin at once.
missing=0
for lock in "${locks[@]}"; do
  [ "$(cat ".venv/.installed-$lock.sha" 2>/dev/null)" = "$(sha256sum "$lock" | cut -d' ' -f1)" ] || missing=1
done
if [ "$missing" -eq 1 ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q $(printf -- '-r %s ' "${locks[@]}")
  for lock in "${locks[@]}"; do sha256sum "$lock" | cut -d' ' -f1 > ".venv/.installed-$lock.sha"; done
fi
stamp=.venv/.installed-package.sha
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

# The native popcount kernels (bvit_jax/deploy/native/build.py; rebuilt only when the sources change).
# Without them everything works on the XLA path, so a failed build is a warning, not a failed set-up.
.venv/bin/python -m bvit_jax.deploy.native.build ||
  echo "setup.sh: the native popcount kernels did not build; the packed forward uses its XLA path" >&2
