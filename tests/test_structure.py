"""The package's shape (STYLE.md): no two modules import each other, lazily or not."""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cnnxfer"


def _relative_imports(path: Path) -> set[str]:
    """The package modules `path` imports anywhere in it (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return names - {path.stem}


def test_no_two_modules_import_each_other():
    imports = {path.stem: _relative_imports(path) for path in PACKAGE.glob("*.py")}
    assert {"engine", "evaluate", "predictor", "metrics"} <= set(imports)
    pairs = [(a, b) for a, b in itertools.combinations(sorted(imports), 2) if b in imports[a] and a in imports[b]]
    assert pairs == []
    assert "evaluate" not in imports["engine"] and "engine" not in imports["predictor"]
