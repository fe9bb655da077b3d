"""The package's shape (docs/DESIGN.md, "Module map"): imports point down only, no cycles, no oversized module."""

import ast
import importlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "dinof_diffusers"
# Layers, bottom first: a module may import modules of lower layers, and modules of its own subpackage.
LAYERS = {
    "validation": 0,
    "file_utils": 0,
    "config_utils": 0,
    "hub_utils": 0,
    "code_bundle": 0,
    "data": 0,
    "image_utils": 0,
    "models": 1,
    "schedulers": 1,
    "pipelines": 2,
    "conversion": 3,
    "training": 3,
    "evaluation": 3,
    "__init__": 4,  # the package's public names
}
MAX_LINES = 900
MAX_TRAIN_SCRIPT_LINES = 500


def package_modules():
    """Module name -> path of every module of the package (a subpackage is its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_package_modules(name, path, modules):
    """The package modules that `name` imports (resolved from its source, relative imports included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in modules and module != name}


def layer(name):
    key = name.split(".")[1] if "." in name else "__init__"
    if key not in LAYERS:
        raise AssertionError(f"{name}: a new top-level module; give it a layer in LAYERS (and in docs/DESIGN.md).")
    return LAYERS[key]


def test_every_module_imports_and_imports_point_down_without_cycles():
    modules = package_modules()
    for name in modules:
        importlib.import_module(name)
    graph = {name: imported_package_modules(name, path, modules) for name, path in modules.items()}
    upward = [
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in targets
        if layer(target) > layer(name)
        or (layer(target) == layer(name) > 0 and name.split(".")[:2] != target.split(".")[:2])
    ]
    assert not upward, f"imports that do not point down: {upward}"

    state = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("folder", ["dinof_diffusers", "training_scripts", "benchmarks", "scripts"])
def test_no_module_is_over_the_size_limit(folder):
    sizes = {path: len(path.read_text().splitlines()) for path in (REPO_ROOT / folder).rglob("*.py")}
    assert not {str(path): n for path, n in sizes.items() if n > MAX_LINES}
    train_script = REPO_ROOT / "training_scripts" / "train.py"
    assert len(train_script.read_text().splitlines()) <= MAX_TRAIN_SCRIPT_LINES
