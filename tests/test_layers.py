"""Imports only point down the layers (docs/design.md): core <- methods, models, data, metrics <-
train, merging <- bench, relatedness, pareto <- cli. Nothing imports the package root."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mtlkit"
LAYER = {
    "core": 0,
    "errors": 0,
    "version": 0,
    "estimators": 0,
    "methods": 1,
    "models": 1,
    "data": 1,
    "metrics": 1,
    "train": 2,
    "merging": 2,
    "decentralized": 2,
    "relatedness": 3,
    "pareto": 3,
    "integrations": 3,
    "bench": 3,
    "cli": 4,
}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mtlkit":  # `from mtlkit import data`: the subpackage
                found.update(f"mtlkit.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "mtlkit" or m.startswith("mtlkit.")}


def test_imports_point_down_the_layers():
    bad = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel == Path("__init__.py"):
            continue  # the package root gathers the public API
        own = rel.parts[0].removesuffix(".py")
        for module in imported_modules(path):
            parts = module.split(".")
            if len(parts) == 1 or parts[1] not in LAYER:
                bad.append(f"{rel} imports {module} from the package root")
                continue
            other = parts[1]
            if other == own:
                continue
            if LAYER[other] > LAYER[own] or (LAYER[other] == LAYER[own] and LAYER[own] != 0):
                bad.append(f"{rel} imports {module}")
    assert bad == []


def test_the_estimators_need_no_torch():
    allowed = {"mtlkit.core.registry", "mtlkit.errors"}
    for path in (SRC / "estimators").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(n == "torch" or n.startswith("torch.") for n in names), path
        mtlkit = {n for n in names if n.startswith("mtlkit")}
        assert all(n.startswith("mtlkit.estimators") or n in allowed for n in mtlkit), (path, mtlkit)
