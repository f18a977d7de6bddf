"""Static import graph of a package: what a module imports, transitively, read from the source.

An AST walk, not an import: it sees function-level imports (the guest defers grpc until after
its fork) and ``importlib.import_module("literal")`` calls, and skips ``if TYPE_CHECKING:``
blocks, which never run. Module names are resolved against the files under the package
directory, so moving a module needs no change here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Closure:
    modules: dict[str, Path] = field(default_factory=dict)  # package modules reached → file
    external: set[str] = field(default_factory=set)  # top-level names of other imports


def module_file(package_dir: Path, name: str) -> Path | None:
    """The file of module ``name`` (``pkg.a.b``) under ``package_dir`` (the ``pkg`` folder)."""
    parts = name.split(".")[1:]
    base = package_dir.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if parts and candidate.is_file():
            return candidate
    return package_dir / "__init__.py" if not parts else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterable[ast.AST]:
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(path: Path, module: str) -> dict[str, bool]:
    """Absolute names ``module`` (whose file is ``path``) imports at run time → whether the
    name must be a module: for ``from X import y``, ``X`` must and ``X.y`` may be one."""
    is_package = path.name == "__init__.py"
    names: dict[str, bool] = {}
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update((alias.name, True) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names[base] = True
            for alias in node.names:
                names.setdefault(f"{base}.{alias.name}", False)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names[node.args[0].value] = True
    return names


def import_closure(package_dir: Path, roots: Iterable[str]) -> Closure:
    """Every module of the package ``package_dir.name`` that ``roots`` import, transitively,
    with their parent packages, plus the top-level names of everything else they import."""
    package = package_dir.name
    closure = Closure()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in closure.modules:
            continue
        path = module_file(package_dir, name)
        if path is None:
            raise LookupError(f"{name} has no source under {package_dir}")
        closure.modules[name] = path
        parents = name.split(".")
        todo += [".".join(parents[:i]) for i in range(1, len(parents))]
        for imported, required in imported_names(path, name).items():
            top = imported.split(".")[0]
            if top != package:
                closure.external.add(top)
            elif module_file(package_dir, imported) is not None:
                todo.append(imported)
            elif required:
                raise LookupError(f"{name} imports {imported}, which has no source")
    return closure
