"""The package's shape (STYLE.md): every module sits on a floor and imports only from lower floors.

FLOORS lists every module of cnnxfer/ (the inspect subpackage as `inspect.<name>`, its
`__init__` as `inspect`), bottom to top: each module one floor above the highest module it imports, as the graph stood when
the list was written (35 modules of cnnxfer/ on 16 floors since `fit` was taken apart into trainset,
epochs, probing and stopper, issue 18; STYLE.md's 31 on 10 before; 37 with budget and leaderboard,
issue 19; 41 with audit, confident, neighbours and quality, issue 20). A new module must be placed
here, and an import that goes sideways or up fails with the file, line and both floors named. Lazy imports
inside functions count like top-level ones: they are the same dependency, paid later.

`__init__` is on the ground floor: it holds `__version__` and loads its public names by name on
first use (PEP 562, importlib, no import statement), so `from . import __version__` is no climb.
"""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cnnxfer"

FLOORS = [
    "__init__ activations check_result confident errors neighbours quality signals stopper timm_import",
    "budget checkpoint copies distributed gradcheck inspect.receptive",
    "device metrics plots",
    "config report",
    "data",
    "preprocess probe rundir inspect.audit_page",
    "calibration loader models selection",
    "convert session strategy",
    "engine predictor inspect.subject",
    "export features overfit recipe inspect.class_model inspect.filters inspect.invariance inspect.layers inspect.worst",
    "audit evaluate sanity trainset inspect.embedding inspect.patches",
    "epochs inspect.page",
    "leaderboard probing inspect",
    "training",
    "cli",
    "__main__",
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names.split()}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _package_imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every relative import in `path`, inside functions too; `from .x import
    name` is module x.name when that is a module (`from .inspect import page`), else module x."""
    here = _module_name(path)
    package = [] if here == "__init__" else here.split(".")[: None if path.name == "__init__.py" else -1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        stem = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
        for alias in node.names:
            full = ".".join([*stem, alias.name])
            out.append((node.lineno, full if full in modules else ".".join(stem) or "__init__"))
    return [(line, name) for line, name in out if name != here]


def test_every_module_is_on_one_floor():
    modules = _modules()
    listed = [name for names in FLOORS for name in names.split()]
    assert sorted(set(listed)) == sorted(listed), "a module is on two floors"
    assert sorted(set(modules) - set(FLOOR)) == [], "new modules: put them on a floor in FLOORS"
    assert sorted(set(FLOOR) - set(modules)) == [], "FLOORS names modules that no longer exist"


def test_imports_go_only_down():
    modules = _modules()
    climbs = [f"cnnxfer/{path.relative_to(PACKAGE)}:{line} imports {target} (floor {FLOOR[target]}) "
              f"from {name} (floor {FLOOR[name]})"
              for name, path in modules.items() if name in FLOOR
              for line, target in _package_imports(path, modules) if target in FLOOR and FLOOR[target] >= FLOOR[name]]
    assert climbs == []


def test_only_the_cli_and_inspect_render():
    """STYLE.md: lower modules never import cli or report (the library returns results)."""
    modules = _modules()
    users = sorted(name for name, path in modules.items()
                   for _, target in _package_imports(path, modules) if target in ("report", "cli"))
    assert {u for u in users if u not in ("cli", "__main__") and not u.startswith("inspect")} == set()


def test_no_two_modules_import_each_other():
    modules = _modules()
    imports = {name: {t for _, t in _package_imports(path, modules)} for name, path in modules.items()}
    assert {"engine", "evaluate", "predictor", "metrics"} <= set(imports)
    pairs = [(a, b) for a, b in itertools.combinations(sorted(imports), 2) if b in imports[a] and a in imports[b]]
    assert pairs == []
    assert "evaluate" not in imports["engine"] and "engine" not in imports["predictor"]


def test_the_cli_starts_without_the_heavy_libraries():
    """`cnnxfer --help` and usage errors load typer and the configs only; each command imports what
    it needs when it runs (torch ~2 s, timm ~1.5 s more, pandas, pyarrow, rich, matplotlib)."""
    import subprocess
    import sys

    heavy = ["torch", "timm", "torchvision", "pandas", "pyarrow", "matplotlib", "rich", "numpy", "PIL", "scipy"]
    code = f"import sys, cnnxfer.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PACKAGE.parent)
    assert done.stdout.strip() == "[]"
