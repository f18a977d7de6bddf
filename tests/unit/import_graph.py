"""What modules import, read from their source: the one import reader of the static tests.

:func:`read_imports` is an AST walk, not an import: it sees every ``import`` and ``from ...
import`` (function-level ones too: the guest defers grpc until after its fork), literal
``importlib.import_module("...")`` / ``__import__("...")`` calls and ``[..., "-m", "pkg.mod"]``
argv lists, and marks what sits in a function or in an ``if TYPE_CHECKING:`` block (which never
runs); each test picks the imports its rule is about. The architecture test, the agent contract
test, the packaging test and the payload closure (:func:`import_closure`: what a module
imports, transitively, at run time) all read imports through it. Module names are resolved
against the files under the package directory, so moving a module needs no change here.
"""

from __future__ import annotations

import ast
import itertools
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


@dataclass(frozen=True)
class Import:
    """One dependency read from a module's source.

    ``module`` is absolute (relative imports resolved against the importer): ``X`` of ``import
    X`` and of ``from X import a, b`` (then ``names`` are ``a, b`` and ``bound`` the names they
    are bound to, ``as`` included), the literal of ``importlib.import_module("X")`` /
    ``__import__("X")``, and ``X`` of an argv list ``[..., "-m", "X", ...]``, which starts a
    child Python on it. ``how`` says which: ``import``, ``from``, ``import_module``,
    ``__import__`` or ``-m``."""

    module: str
    how: str
    line: int
    names: tuple[str, ...] = ()
    bound: tuple[str, ...] = ()
    level: int = 0  # the dots of a relative ``from`` (0: absolute)
    top_level: bool = False  # a statement directly in the module's body
    deferred: bool = False  # inside a function or lambda: runs only when it is called
    type_checking: bool = False  # inside ``if TYPE_CHECKING:``: never runs

    @property
    def runtime(self) -> bool:
        return not self.type_checking

    @property
    def at_import(self) -> bool:
        """Runs when the module is imported (a class body does; a function body does not)."""
        return not (self.type_checking or self.deferred)


def absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The module ``from {"." * level}{name} import ...`` reads in ``module`` (a package when
    ``is_package``, i.e. its file is ``__init__.py``)."""
    if not level:
        return name or ""
    anchor = module.split(".")
    anchor = anchor[: len(anchor) - level + (1 if is_package else 0)]
    return ".".join(anchor + ([name] if name else []))


def module_of(path: Path, package_dir: Path) -> tuple[str, bool]:
    """The module name of ``path`` under ``package_dir`` (the ``pkg`` folder), and whether it is
    a package (its ``__init__.py``)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def read_imports(source: str | ast.Module, module: str, is_package: bool = False) -> list[Import]:
    """Every :class:`Import` in ``source`` (text or a parsed tree) of ``module``, in source
    order, each with where it sits (module body, function, ``if TYPE_CHECKING:``)."""
    tree = ast.parse(source) if isinstance(source, str) else source
    found: list[Import] = []

    def visit(node: ast.AST, top: bool, deferred: bool, typing_only: bool) -> None:
        where = {"top_level": top, "deferred": deferred, "type_checking": typing_only}
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name, "import", node.lineno, **where))
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, is_package, node.level, node.module)
            names = tuple(a.name for a in node.names)
            bound = tuple(a.asname or a.name for a in node.names)
            found.append(Import(base, "from", node.lineno, names, bound, node.level, **where))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = _literal(node.args[0])
            if called in ("import_module", "__import__") and target:
                found.append(Import(target, called, node.lineno, **where))
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = [_literal(e) for e in node.elts]
            for flag, target in itertools.pairwise(items):
                if flag == "-m" and target:
                    found.append(Import(target, "-m", node.lineno, **where))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False, deferred, True)
            for child in node.orelse:
                visit(child, False, deferred, typing_only)
            return
        inner = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, isinstance(node, ast.Module), inner, typing_only)

    visit(tree, False, False, False)
    return found


def imported_names(path: Path, module: str) -> dict[str, bool]:
    """Absolute names ``module`` (whose file is ``path``) imports at run time → whether the
    name must be a module: for ``from X import y``, ``X`` must and ``X.y`` may be one."""
    names: dict[str, bool] = {}
    is_package = path.name == "__init__.py"
    for imp in read_imports(path.read_text(), module, is_package):
        if not imp.runtime or imp.how == "-m":  # argv of any program (QEMU's -m is memory)
            continue
        names[imp.module] = True
        for name in imp.names:
            names.setdefault(f"{imp.module}.{name}", False)
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
