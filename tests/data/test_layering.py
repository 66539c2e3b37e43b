"""The data layer depends on nothing above it: no module under ``boost_lightning/data`` imports the simulators
(``boost_lightning.envs``), the model code (``boost_lightning.models``) or the composition root
(``boost_lightning.resolve``), not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import boost_lightning

DATA = Path(boost_lightning.__file__).parent / "data"
FORBIDDEN = ("boost_lightning.envs", "boost_lightning.models", "boost_lightning.resolve")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` anywhere in the file names (relative imports resolved)."""
    package = "boost_lightning.data"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # from boost_lightning import envs
    return names


@pytest.mark.parametrize("path", sorted(DATA.rglob("*.py")), ids=lambda p: p.name)
def test_data_never_imports_the_layers_above(path):
    bad = {name for name in imported_modules(path) if name.startswith(FORBIDDEN)}
    assert not bad, f"{path.name} imports {sorted(bad)}: register a resolver in boost_lightning.data.specs instead"


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    source = tmp_path / "planted.py"
    source.write_text("def f():\n    from boost_lightning.envs.embedded import ensure_embedded\n"
                      "def g():\n    from .. import envs\n")
    assert {"boost_lightning.envs.embedded", "boost_lightning.envs"} <= imported_modules(source)
