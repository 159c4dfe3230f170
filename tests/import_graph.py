# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""The project modules a Python file imports, directly or through other project modules, read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "anomalib_uas"


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of a project module (a package's ``__init__.py``), or ``None`` for other modules."""
    if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
        return None
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST) -> set[str]:
    """Modules named by import statements anywhere in a file (in functions too), except ``if TYPE_CHECKING:``."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:index]) for index in range(1, len(parts) + 1)]


def project_imports(path: Path, root: Path = REPO, extra: dict[str, set[str]] | None = None) -> set[Path]:
    """Every project file that running ``path`` can import, following imports transitively.

    Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so parent packages are included.

    Args:
        path: The script or module.
        root: The repository root.
        extra: Imports the source does not name (looked up by name at run time): module -> modules it imports.

    Returns:
        The project files, the script itself included.
    """
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        names = _imported_names(ast.parse(current.read_text()))
        module = ".".join(current.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        names |= (extra or {}).get(module, set())
        for name in names:
            for parent in _with_parents(name):
                found = module_file(parent, root)
                if found is not None and found not in seen:
                    todo.append(found)
    return seen
