"""The package layout stays true: every module imports, and dependencies run one way (down).

Layers, top to bottom: cli → serving → compare → artifacts → training → features → generation
→ model → bases → the shared leaves (files, errors, recipe, progress, versions). A module may import its own subpackage or
any layer below it, never one above, and no two modules may import each other (no cycle).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import composer

ROOT = Path(composer.__file__).parent
LAYERS = [
    "leaf",
    "bases",
    "model",
    "generation",
    "features",
    "training",
    "artifacts",
    "compare",
    "serving",
]


def _modules() -> list[str]:
    # composer.__main__ is `python -m composer`: importing it runs the command line.
    found = pkgutil.walk_packages([str(ROOT)], prefix="composer.")
    return sorted(m.name for m in found if not m.name.endswith("__main__"))


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return 0  # composer, composer.files, composer.errors, composer.recipe, ...


def _imports(module: str) -> set[str]:
    """Every `composer.*` module that `module` imports, at top level or inside a function."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("composer"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from composer.bases import pull` names a module; `from x import f`, a name in x.
                found.add(
                    sub if _is_pkg(node.module) and importlib.util.find_spec(sub) else node.module
                )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("composer")}
    return {m for m in found if m != module}


def _is_pkg(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def test_every_module_imports() -> None:
    for name in _modules():
        importlib.import_module(name)


def test_dependencies_run_down() -> None:
    upward = []
    for module in _modules():
        for dep in _imports(module):
            if _layer(dep) > _layer(module):
                upward.append(f"{module} imports {dep}")
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = {m: {d for d in _imports(m) if d in set(_modules())} for m in _modules()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, dep]))
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def _imports_of_room(room: str) -> dict[str, set[str]]:
    return {m: _imports(m) for m in _modules() if m.startswith(f"composer.{room}.")}


def test_storing_a_mixture_never_reaches_into_training() -> None:
    """artifacts/ reads the mixture's folder format from model/, not from training/."""
    found = [
        f"{m} imports {d}"
        for m, deps in _imports_of_room("artifacts").items()
        for d in deps
        if d.startswith("composer.training")
    ]
    assert not found, "\n".join(found)


def test_running_a_mixture_needs_no_training_compare_or_serving() -> None:
    """generation/ is the decoder alone: it may be used by anything above it, and uses none."""
    rooms = ("composer.training", "composer.compare", "composer.serving", "composer.features")
    found = [
        f"{m} imports {d}"
        for m, deps in _imports_of_room("generation").items()
        for d in deps
        if d.startswith(rooms)
    ]
    assert not found, "\n".join(found)
    assert _imports_of_room("generation"), "composer/generation holds no module"
