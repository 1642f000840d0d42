"""No import cycles inside ``vggbackbone/`` and ``tasks/``: read every module's ``import``
statements (module level and inside functions alike, so a lazy import cannot hide a cycle) and
look for a cycle in the graph of the package's own modules."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``; ``from pkg import name`` counts as
    importing ``pkg.name`` when that is a module, else ``pkg``."""
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                # "import a.b.c" imports a, a.b and a.b.c: the deepest one of the package stands for it
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.split(".")[0] == package:
                    graph[mod].add(t)
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for mod in list(graph):
        for dep in list(graph[mod]):
            parts = dep.split(".")
            graph[mod].update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in files and p != mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _is_package_parent_edge(a: str, b: str) -> bool:
    return a.startswith(b + ".")


def test_find_cycle_finds_a_planted_cycle_and_none_where_there_is_none() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize(
    "package",
    ["vggbackbone", "tasks"],
)
def test_no_import_cycle(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 3, f"{package}: found too few modules ({sorted(graph)})"
    # a package's __init__ re-exporting its submodules is not a cycle of the submodules with
    # it: Python runs __init__ first, then the submodule it imports
    graph = {m: {d for d in deps if not _is_package_parent_edge(m, d)} for m, deps in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, f"{package}: import cycle " + " -> ".join(cycle)


def test_vggbackbone_graph_holds_its_known_edges_and_sorts() -> None:
    """The graph is read right (the backbone's known imports are in it) and a topological order
    of the library's modules exists (graphlib names a cycle otherwise)."""
    graph = import_graph("vggbackbone")
    assert {"vggbackbone.vgg", "vggbackbone.weights", "vggbackbone.config"} <= set(graph)
    assert "vggbackbone.config" in graph["vggbackbone.weights"] and "vggbackbone.weights" in graph["vggbackbone.vgg"]
    graph = {m: {d for d in deps if not _is_package_parent_edge(m, d)} for m, deps in graph.items()}
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError naming the cycle


#: What the plain PyTorch library never imports (docs/design.md: "never Lightning").
LIBRARY_NEVER_IMPORTS = ("tasks", "pytorch_lightning", "lightning", "lightning_fabric", "jsonargparse")


def imported_names(path: Path) -> set[str]:
    """Every module name a file imports, at any depth of its code (function-level imports and
    ``importlib.import_module("literal")`` calls included); relative imports are left out (they
    stay inside the package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def forbidden_imports(package_dir: Path, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """``{file relative to package_dir's parent: forbidden names it imports}`` for every ``.py``
    file under ``package_dir``."""
    found: dict[str, list[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        bad = sorted(n for n in imported_names(path) if n.split(".")[0] in forbidden)
        if bad:
            found[str(path.relative_to(package_dir.parent))] = bad
    return found


def test_forbidden_imports_finds_planted_imports_at_any_depth(tmp_path: Path) -> None:
    pkg = tmp_path / "lib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import torch\nfrom . import sub\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "late.py").write_text(
        "def f():\n    if True:\n        from pytorch_lightning.callbacks import Callback\n    return Callback\n"
    )
    (pkg / "sub" / "dynamic.py").write_text("import importlib\nm = importlib.import_module('tasks.detect')\n")
    (pkg / "clean.py").write_text("from torch import nn\nimport lightningx\n")  # a prefix only: allowed
    assert forbidden_imports(pkg, LIBRARY_NEVER_IMPORTS) == {
        "lib/sub/dynamic.py": ["tasks.detect"],
        "lib/sub/late.py": ["pytorch_lightning.callbacks"],
    }


def test_library_never_imports_tasks_lightning_or_jsonargparse() -> None:
    assert len(list((ROOT / "vggbackbone").rglob("*.py"))) > 10
    assert forbidden_imports(ROOT / "vggbackbone", LIBRARY_NEVER_IMPORTS) == {}


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in conftest.py (fixtures) or in helper modules not named ``test_*``
    (cli_configs, backbone_utils, recipe_trees, inference_probe...), never in another test module."""
    found = {
        path.name: sorted(n for n in imported_names(path) if n.split(".")[-1].startswith("test_"))
        for path in sorted((ROOT / "tests").glob("*.py"))
    }
    assert len(found) > 50
    assert {name: bad for name, bad in found.items() if bad} == {}


#: The task modules (``python -m tasks.<task>``); ``tasks/<task>_*.py`` are their companions
#: (writers, ReID's evaluation and extraction). Everything else in ``tasks/`` is the shared glue.
TASK_MODULES = ("detect", "segment", "reid", "classify")


def package_imports(package: str) -> dict[str, set[str]]:
    """:func:`import_graph` plus the package's modules named in ``importlib.import_module("...")``
    calls (a dynamic import of a task module counts as importing it)."""
    graph = import_graph(package)
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    for mod, path in files.items():
        for name in imported_names(path):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != mod:
                graph[mod].add(name)
    return graph


def layering_violations(graph: dict[str, set[str]], package: str = "tasks") -> dict[str, list[str]]:
    """``{module: task modules it imports}`` for the glue and for ``<package>.data``: neither may
    import a task module (``<package>.<task>``); the task modules and their companions may."""
    tasks = {f"{package}.{t}" for t in TASK_MODULES}
    found: dict[str, list[str]] = {}
    for mod, deps in graph.items():
        top = mod.split(".")[1] if mod.count(".") else ""
        if mod in tasks or any(top.startswith(f"{t}_") for t in TASK_MODULES):
            continue  # a task module or a companion of one
        bad = sorted(deps & tasks)
        if bad:
            found[mod] = bad
    return found


def test_layering_check_finds_planted_violations() -> None:
    graph = {
        "tasks": set(),
        "tasks.detect": {"tasks.module", "tasks.data.detection"},
        "tasks.detect_writer": {"tasks.detect"},  # a companion: allowed
        "tasks.reid_eval": {"tasks.reid"},
        "tasks.reid": {"tasks.reid_eval"},
        "tasks.module": {"tasks.outputs"},
        "tasks.cli": {"tasks.segment", "tasks.module"},  # glue importing a task
        "tasks.data.detection": {"tasks.detect", "tasks.data.coco"},  # data importing a task
        "tasks.data.coco": {"tasks.data.detection"},
    }
    assert layering_violations(graph) == {"tasks.cli": ["tasks.segment"], "tasks.data.detection": ["tasks.detect"]}


def test_glue_and_data_never_import_a_task_module() -> None:
    """docs/design.md's layering: the task modules sit on the glue and on ``tasks/data``, never
    the other way round (function-level and ``import_module`` imports included)."""
    graph = package_imports("tasks")
    assert {f"tasks.{t}" for t in TASK_MODULES} <= set(graph)
    assert {"tasks.cli", "tasks.module", "tasks.data.detection"} <= set(graph)
    assert layering_violations(graph) == {}
