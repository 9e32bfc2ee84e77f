"""pyproject.toml declares the dependency groups; the requirements*.txt lock files pin them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared(group: str) -> dict[str, Requirement]:
    reqs = PYPROJECT["dependencies"] if group == "core" else PYPROJECT["optional-dependencies"][group]
    out = {}
    for line in reqs:
        r = Requirement(line)
        if canonicalize_name(r.name) != canonicalize_name(PYPROJECT["name"]):  # self-references: other groups
            out[canonicalize_name(r.name)] = r
    return out


def _pinned(group: str) -> dict[str, str]:
    path = ROOT / ("requirements.txt" if group == "core" else f"requirements-{group}.txt")
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
            assert m, f"{path.name}: '{line}' is not a 'name==version' pin"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


GROUPS = ["core", *PYPROJECT["optional-dependencies"]]


@pytest.mark.parametrize("group", GROUPS)
def test_every_declared_dependency_is_pinned_in_its_lock_file_within_its_range(group):
    declared, pinned = _declared(group), _pinned(group)
    assert declared.keys() <= pinned.keys(), f"declared in pyproject but not pinned: {declared.keys() - pinned.keys()}"
    for name, req in declared.items():
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} outside {req.specifier}"


def test_no_package_is_pinned_twice_and_the_core_holds_no_torch_or_tensorflow():
    seen: dict[str, str] = {}
    for group in GROUPS:
        for name in _pinned(group):
            assert name not in seen, f"{name} pinned in both {seen[name]} and {group}"
            seen[name] = group
    core = _pinned("core").keys() | _declared("core").keys()
    assert not {n for n in core if n.startswith(("torch", "tensorflow")) and n != "tensorflow-datasets"}
    assert "jaxlib" in core and "jax" in core


def test_test_extra_pulls_in_every_other_extra():
    self_refs = [
        Requirement(r)
        for r in PYPROJECT["optional-dependencies"]["test"]
        if canonicalize_name(Requirement(r).name) == canonicalize_name(PYPROJECT["name"])
    ]
    assert len(self_refs) == 1
    assert self_refs[0].extras == set(GROUPS) - {"core", "test"}
