"""Import rules of the repository, checked on the source (nothing is imported or run).

* No module (library, tests, benchmarks, configs) uses a private name (a
  leading underscore) of another of this project's modules: what is shared is
  public and documented.
* The library never touches ``sys.path`` and never imports ``configs``.
* ``bvit_jax.runs.checkpoint`` is plain orbax: it does not know the models
  (``bvit_jax.runs.workdir`` joins the two).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.train_helpers import ROOT

OWN = ("bvit_jax", "configs", "tests", "benchmarks")
SOURCES = sorted(
    p for d in OWN for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts and "egg-info" not in str(p)
) + [ROOT / "train.py"]


def _private_uses(path: Path) -> list[str]:
    """``'line: name'`` for every private name of a project module that ``path`` imports or reads."""
    tree = ast.parse(path.read_text(), str(path))
    modules: set[str] = set()  # local names bound to project modules (or to names imported from them)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in OWN):
            for alias in node.names:
                if alias.name.startswith("_"):
                    out.append(f"{node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OWN:
                    modules.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_module_uses_a_private_name_of_another():
    found = {str(p.relative_to(ROOT)): uses for p in SOURCES if (uses := _private_uses(p))}
    assert found == {}


def test_the_checker_finds_private_uses(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from bvit_jax.train import _secret\nfrom bvit_jax.data import pipeline\nx = pipeline._Hidden.y\nself._ok = 1\n"
    )
    assert _private_uses(probe) == ["1: from bvit_jax.train import _secret", "3: pipeline._Hidden"]


@pytest.mark.parametrize("path", sorted((ROOT / "bvit_jax").rglob("*.py")), ids=lambda p: p.name)
def test_the_library_touches_no_sys_path_and_imports_no_configs(path):
    text = path.read_text()
    assert "sys.path" not in text
    for node in ast.walk(ast.parse(text)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not [n for n in names if n.split(".")[0] in ("configs", "tests", "benchmarks")], path


def _project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports (``from a import x`` counts as ``a.x``), lazy ones too."""
    tree = ast.parse(path.read_text(), str(path))
    out = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            out |= {f"{n.module}.{a.name}" for a in n.names}  # module.name: a submodule or a name in it
    return {m for m in out if m.split(".")[0] == "bvit_jax"}


# What each part of the package may import of the project (itself always): the layering of
# docs/architecture.md and of each subpackage's docstring. The most specific entry wins.
CONTRACTS = {
    "bvit_jax/__init__.py": (),  # imports nothing: importing a subpackage stays cheap
    "bvit_jax/errors.py": (),
    "bvit_jax/cli.py": ("bvit_jax.errors",),
    "bvit_jax/nn": ("bvit_jax.errors",),
    "bvit_jax/data": ("bvit_jax.errors", "bvit_jax.cli"),
    "bvit_jax/runs": ("bvit_jax.errors", "bvit_jax.nn"),
    # plain orbax: it does not know the models (bvit_jax.runs.workdir joins the two)
    "bvit_jax/runs/checkpoint.py": ("bvit_jax.errors", "bvit_jax.runs.storage"),
    "bvit_jax/runs/storage.py": ("bvit_jax.errors",),
    "bvit_jax/train": ("bvit_jax.errors", "bvit_jax.cli", "bvit_jax.nn", "bvit_jax.runs", "bvit_jax.data"),
    # the config schema: what configs/ and the timm import read, without the trainer
    "bvit_jax/train/recipes.py": ("bvit_jax.nn", "bvit_jax.data"),
    "bvit_jax/deploy": ("bvit_jax.errors", "bvit_jax.cli", "bvit_jax.nn", "bvit_jax.runs", "bvit_jax.data"),
    "bvit_jax/interop": (
        "bvit_jax.errors",
        "bvit_jax.cli",
        "bvit_jax.nn",
        "bvit_jax.runs",
        "bvit_jax.train.recipes",
    ),
}


def _contract(rel: str) -> tuple[str, tuple[str, ...]]:
    key = max((k for k in CONTRACTS if rel == k or rel.startswith(k + "/")), key=len)
    own = key.removesuffix(".py").replace("/", ".")
    return key, CONTRACTS[key] + (own,)


def _breaches(path: Path) -> list[str]:
    rel = str(path.relative_to(ROOT))
    _, allowed = _contract(rel)
    return sorted(m for m in _project_imports(path) if not any(m == a or m.startswith(a + ".") for a in allowed))


LIBRARY = sorted((ROOT / "bvit_jax").rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT / "bvit_jax")))
def test_each_module_imports_only_what_its_subpackage_may(path):
    assert _breaches(path) == []


def test_every_library_module_is_under_a_contract():
    uncovered = [p for p in LIBRARY if not any(str(p.relative_to(ROOT)).startswith(k) for k in CONTRACTS)]
    assert uncovered == []


def test_the_contract_checker_finds_a_breach(tmp_path, monkeypatch):
    probe = ROOT / "bvit_jax" / "nn" / "probe_for_the_contract_test.py"
    monkeypatch.setattr(
        Path, "read_text", lambda self: "from bvit_jax.train import trainer\nimport bvit_jax.nn.models\n"
    )
    assert _breaches(probe) == ["bvit_jax.train.trainer"]
    probe = ROOT / "bvit_jax" / "deploy" / "probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self: "from bvit_jax import runs, train\n")
    assert _breaches(probe) == ["bvit_jax.train"]
