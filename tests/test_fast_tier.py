"""The fast tier (`python -m pytest -m "not slow"`) still touches every module of the package: each
module is imported by name in a test file that has a test not marked slow, outside that file's slow
tests. Read from the test files' syntax trees, so that this holds whichever tests are selected."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = "ensemble"


def package_modules() -> set[str]:
    """Every module of the package by its dotted name (packages' __init__ files aside: they are
    imported with any of their modules)."""
    root = REPO / PACKAGE
    return {
        ".".join((PACKAGE, *path.relative_to(root).with_suffix("").parts))
        for path in root.rglob("*.py")
        if path.name != "__init__.py"
    }


def _is_slow_mark(node: ast.expr) -> bool:
    """`pytest.mark.slow`, as a decorator, in `pytestmark = ...` or in a list of marks."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_is_slow_mark(e) for e in node.elts)
    return (
        isinstance(node, ast.Attribute) and node.attr == "slow" and ast.unparse(node.value) == "pytest.mark"
    )


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules that the import statements under ``node`` name."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            found |= {alias.name for alias in sub.names}
        elif isinstance(sub, ast.ImportFrom) and sub.module and not sub.level:
            found.add(sub.module)
            found |= {f"{sub.module}.{alias.name}" for alias in sub.names}  # from ensemble import cli
    return found & modules


def fast_imports(path: Path, modules: set[str]) -> tuple[set[str], int, int]:
    """(the modules imported outside the slow tests of a test file, if it has any fast test; its
    fast tests; its slow tests)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    slow_file = any(
        isinstance(n, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)
        and _is_slow_mark(n.value)
        for n in tree.body
    )
    tests = [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")
    ]
    slow = [t for t in tests if slow_file or any(_is_slow_mark(d) for d in t.decorator_list)]
    fast = len(tests) - len(slow)
    if path.name == "conftest.py":
        fast = max(fast, 1)  # loaded by every selection
    if not fast:
        return set(), 0, len(slow)
    outside_slow = ast.Module(body=[n for n in tree.body if n not in slow], type_ignores=[])
    return _imported(outside_slow, modules), fast, len(slow)


def test_every_module_has_a_fast_test_that_imports_it():
    modules = package_modules()
    assert f"{PACKAGE}.config.schema" in modules and f"{PACKAGE}.errors" in modules
    covered: set[str] = set()
    fast_total = slow_total = 0
    for path in sorted((REPO / "tests").glob("test_*.py")) + [REPO / "tests" / "conftest.py"]:
        imported, fast, slow = fast_imports(path, modules)
        covered |= imported
        fast_total, slow_total = fast_total + fast, slow_total + slow
    assert fast_total and slow_total, (fast_total, slow_total)
    missing = sorted(modules - covered)
    assert not missing, (
        f"no fast test imports {', '.join(missing)}: add a test not marked slow that imports it "
        '(python -m pytest -m "not slow" must touch every module)'
    )


def test_the_checker_sees_slow_marks(tmp_path):
    modules = {"ensemble.a", "ensemble.b", "ensemble.c"}
    (tmp_path / "test_mixed.py").write_text(
        "import pytest\nfrom ensemble.a import x\n\n"
        "@pytest.mark.slow\ndef test_slow():\n    from ensemble.b import y\n\n"
        "def test_fast():\n    from ensemble import c\n"
    )
    (tmp_path / "test_all_slow.py").write_text(
        "import pytest\nimport ensemble.b\npytestmark = [pytest.mark.slow]\n\ndef test_one():\n    pass\n"
    )
    assert fast_imports(tmp_path / "test_mixed.py", modules) == ({"ensemble.a", "ensemble.c"}, 1, 1)
    assert fast_imports(tmp_path / "test_all_slow.py", modules) == (set(), 0, 1)
