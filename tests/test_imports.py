"""Import rules of the repository, checked on the source (nothing is imported or run).

* No module (library, tests, benchmarks, configs) uses a private name (a
  leading underscore) of another of this project's modules: what is shared is
  public and documented.
* The library never touches ``sys.path`` and never imports ``configs``.
* ``bvit_jax.checkpoint`` is plain orbax: it does not know the models
  (``bvit_jax.workdir`` joins the two).
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


def test_checkpoint_does_not_import_the_models():
    tree = ast.parse((ROOT / "bvit_jax" / "checkpoint.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module != "bvit_jax"}
    imported |= {
        f"bvit_jax.{a.name}"
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "bvit_jax"
        for a in n.names
    }
    # bvit_jax.storage (paths local or in a bucket) imports only bvit_jax.errors of the project.
    assert not {m for m in imported if m.startswith("bvit_jax") and m not in ("bvit_jax.errors", "bvit_jax.storage")}
