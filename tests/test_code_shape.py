"""Short modules with one job: no module over ``MAX_MODULE_LINES`` lines (``vggbackbone/``,
``tasks/``, ``benchmarks/``, ``tests/``) and no function or method over ``MAX_FUNCTION_LINES``
lines, its docstring not counted. A module or function that grows past these is split along its
seams (docs/design.md lists the modules and what each holds)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
CHECKED = ("vggbackbone", "tasks", "benchmarks", "tests")


def _docstring_lines(node: ast.AST) -> int:
    body = getattr(node, "body", None)
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, lines)`` of every function or method of ``source`` (nested
    ones included) longer than ``limit`` lines, decorators and docstring not counted."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = child.end_lineno - child.lineno + 1 - _docstring_lines(child)
                if lines > limit:
                    found.append((name[:-1], child.lineno, lines))
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def python_files() -> list[Path]:
    return sorted(p for d in CHECKED for p in (ROOT / d).rglob("*.py"))


def test_long_functions_measures_without_docstring_and_finds_nested_ones() -> None:
    def block(indent: int) -> str:  # a 3-line docstring and 79 lines of code
        pad = " " * indent
        return f'{pad}"""one\n{pad}two\n{pad}three"""\n' + "".join(f"{pad}x{i} = {i}\n" for i in range(79))

    source = (
        f"def short():\n{block(4)}"  # def + 79 lines: exactly the limit
        f"class A:\n    def long(self):\n{block(8)}        pass\n"  # 81
        f"def outer():\n    def inner():\n{block(8)}        pass\n    return inner\n"  # 81 and 86
    )
    assert [(name, lines) for name, _, lines in long_functions(source)] == [
        ("A.long", 81),
        ("outer", 86),  # its inner function's docstring is code of outer
        ("outer.inner", 81),
    ]


def test_no_module_over_the_line_limit() -> None:
    files = python_files()
    assert len(files) > 50
    too_long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert too_long == {}, f"modules over {MAX_MODULE_LINES} lines: split them along their seams"


def test_no_function_over_the_line_limit() -> None:
    too_long = {
        f"{p.relative_to(ROOT)}:{line} {name}": n
        for p in python_files()
        for name, line, n in long_functions(p.read_text())
    }
    assert too_long == {}, f"functions over {MAX_FUNCTION_LINES} lines (docstrings excluded)"
