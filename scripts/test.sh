#!/usr/bin/env bash
# Set up everything the suite needs (scripts/setup.sh test), check lint and
# formatting (ruff, configured in pyproject.toml), run the whole test suite on two workers that steal
# each other's queued tests (the long ones go first: tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -n 2 --dist worksteal -q "$@" tests
