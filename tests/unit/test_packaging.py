"""A plain ``pip install vsockrpc`` (no extras) carries everything the package imports at run
time, the host CLI included. The rule: a module-level third-party import must be a base
dependency; a declared optional extra (``[project.optional-dependencies]``, e.g. ``bench`` →
matplotlib) may be imported only inside a function, which runs only when the feature is used
(and can check that the extra is installed first)."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from tests.unit.import_graph import imported_names, module_of, read_imports
from vsockrpc.payload import normalize, package_dir

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# The toolchain, not a feature of the installed package: never imported by it.
NOT_RUNTIME_EXTRAS = frozenset({"dev"})


def _names(requirements: list[str]) -> set[str]:
    found = (re.match(r"[A-Za-z0-9._-]+", requirement) for requirement in requirements)
    return {normalize(m.group(0)) for m in found if m}


def _base_dependencies() -> set[str]:
    return _names(tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"])


def _optional_dependencies() -> set[str]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"].get("optional-dependencies", {})
    return {
        name
        for extra, requirements in extras.items()
        if extra not in NOT_RUNTIME_EXTRAS
        for name in _names(requirements)
    }


def module_level_imports(source: str) -> set[str]:
    """Names imported when the module is imported: anywhere but inside a function (a class
    body runs at import), ``if TYPE_CHECKING:`` blocks excepted (they never run)."""
    return {
        imp.module
        for imp in read_imports(source, "")
        if imp.at_import and (imp.how == "import" or (imp.how == "from" and not imp.level))
    }


def _third_party_imports() -> dict[str, dict[str, bool]]:
    """Top-level import name → {importing module: whether it imports it at module level}
    (run-time imports only)."""
    base = package_dir()
    found: dict[str, dict[str, bool]] = {}
    for path in sorted(base.rglob("*.py")):
        module, _ = module_of(path, base)
        eager = {name.split(".")[0] for name in module_level_imports(path.read_text())}
        for name in imported_names(path, module):
            top = name.split(".")[0]
            if top == "vsockrpc" or top in sys.stdlib_module_names:
                continue
            users = found.setdefault(top, {})
            users[module] = users.get(module, False) or top in eager
    return found


def _distributions(top: str, provided: dict[str, list[str]]) -> set[str]:
    """The distributions providing import name ``top``; an extra that is not installed here
    (so not in ``provided``) is known by its own name (matplotlib → matplotlib)."""
    return {normalize(d) for d in provided.get(top, [top])}


def import_rule_breaches(
    imports: dict[str, dict[str, bool]],
    provided: dict[str, list[str]],
    base: set[str],
    optional: set[str],
) -> dict[str, list[str]]:
    """Import name → what is wrong with each module importing it."""
    breaches: dict[str, list[str]] = {}
    for top, users in imports.items():
        dists = _distributions(top, provided)
        if dists & base:
            continue
        for module, eager in sorted(users.items()):
            if not dists & optional:
                problem = f"{module}: not a dependency"
            elif eager:
                problem = f"{module}: an optional extra imported at module level"
            else:
                continue
            breaches.setdefault(top, []).append(problem)
    return breaches


def test_runtime_imports_are_base_dependencies_or_lazily_imported_extras() -> None:
    breaches = import_rule_breaches(
        _third_party_imports(),
        metadata.packages_distributions(),
        _base_dependencies(),
        _optional_dependencies(),
    )
    assert not breaches, (
        "module-level imports must be in [project].dependencies; optional extras "
        f"([project.optional-dependencies]) may be imported only inside functions: {breaches}"
    )


def test_matplotlib_is_an_optional_extra_imported_lazily() -> None:
    assert "matplotlib" in _optional_dependencies()
    assert "matplotlib" not in _base_dependencies()
    users = _third_party_imports()["matplotlib"]
    assert users == {"vsockrpc.bench._plots": False}


def test_the_rule_sees_module_level_and_lazy_imports() -> None:
    source = (
        "import grpc\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import numpy\n"
        "class C:\n"
        "    import yaml\n"
        "def f():\n"
        "    import matplotlib.pyplot\n"
        "async def g():\n"
        "    from scipy import stats\n"
    )
    assert module_level_imports(source) == {"grpc", "typing", "yaml"}
    provided: dict[str, list[str]] = {"grpc": ["grpcio"], "yaml": ["PyYAML"]}
    imports = {
        "grpc": {"m": True},
        "matplotlib": {"lazy": False, "eager": True},
        "yaml": {"m": True},
    }
    assert import_rule_breaches(imports, provided, {"grpcio"}, {"matplotlib"}) == {
        "matplotlib": ["eager: an optional extra imported at module level"],
        "yaml": ["m: not a dependency"],
    }
