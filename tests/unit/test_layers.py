"""Imports flow one way: each package imports only its own layer and the layers below, lazy imports included.

Low to high: preprocessing, hybridcn (profiles, contracts, tensor names), models, training, export, engine,
batch, gateway, hybridcn.cli. An upward import, even one hidden inside a function, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["preprocessing", "hybridcn", "models", "training", "export", "engine", "batch", "gateway", "hybridcn.cli"]
PRODUCT = ["preprocessing", "hybridcn", "models", "training", "export", "engine", "batch", "gateway"]


def layer_of(module: str) -> int | None:
    """The layer index of a dotted module name, or ``None`` for third-party and standard-library modules."""
    if module == "hybridcn.cli" or module.startswith("hybridcn.cli."):
        return LAYERS.index("hybridcn.cli")
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module that ``path`` imports, anywhere in the file, with its line (relative imports resolved)."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # ``from hybridcn import cli`` names a module of a higher layer too
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names
                      if layer_of(f"{module}.{alias.name}") == LAYERS.index("hybridcn.cli")]
    return found


def upward_imports(root: Path = ROOT) -> list[str]:
    problems = []
    for package in PRODUCT:
        for path in sorted((root / package).rglob("*.py")):
            own = layer_of(module_name(path, root))
            for line, module in imports(path, root):
                target = layer_of(module)
                if target is not None and target > own:
                    problems.append(f"{path.relative_to(root)}:{line} imports {module} "
                                    f"({LAYERS[own]} -> {LAYERS[target]})")
    return problems


def test_no_import_runs_up_the_layers():
    assert upward_imports() == []


def test_research_is_apart_from_the_product():
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            assert not any(module.split(".")[0] == "research" for _, module in imports(path)), path


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from gateway.app import create_app\n", "engine/x.py:2 imports gateway.app (engine -> gateway)"),
    ("from ..gateway import app\n", "engine/x.py:1 imports gateway (engine -> gateway)"),
    ("from hybridcn import cli\n", "engine/x.py:1 imports hybridcn.cli (engine -> hybridcn.cli)"),
])
def test_the_check_sees_lazy_relative_and_from_imports(tmp_path, source, expected):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "x.py").write_text(source)
    assert upward_imports(tmp_path) == [expected]
