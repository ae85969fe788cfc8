"""Walking the package's imports with ``ast`` (for the tests of dvc.yaml's deps and of the
package's layers)."""

from __future__ import annotations

import ast
from pathlib import Path

from repository import REPO

SOURCE = REPO / "src"
PACKAGE = "grounding"


def module_file(name: str) -> Path | None:
    """The file of module ``grounding.x.y`` (a package's ``__init__.py``), None outside."""
    if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
        return None
    path = SOURCE.joinpath(*name.split("."))
    if path.is_dir():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def imported_modules(path: Path) -> set[str]:
    """The modules a file imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``, since
    ``c`` may be a submodule), with every parent package of each (importing runs them)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in (node for top in tree.body if runs(top) for node in ast.walk(top)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


def runs(statement: ast.stmt) -> bool:
    """Whether a module's top-level statement can run an import when the module is imported or
    used: not an ``if TYPE_CHECKING:`` block (only type checkers read it) and not a module's
    ``__getattr__`` (``grounding.load_grounder``: a lazy attribute, whose import runs only for
    code that asks for that name; no stage does)."""
    if isinstance(statement, ast.If):
        test = statement.test
        name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
        return name != "TYPE_CHECKING"
    return not (isinstance(statement, ast.FunctionDef) and statement.name == "__getattr__")


def reached_files(script: Path) -> set[Path]:
    """Every file of the package that running ``script`` can import."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in imported_modules(todo.pop()):
            file = module_file(name)
            if file is not None and file not in seen:
                seen.add(file)
                todo.append(file)
    return seen
