"""A plain ``pip install vsockrpc`` (no extras) carries everything the package imports at run
time, the host CLI included: every third-party import is a base dependency."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from tests.unit.import_graph import imported_names
from vsockrpc.payload import normalize, package_dir

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _base_dependencies() -> set[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    names = (re.match(r"[A-Za-z0-9._-]+", dep) for dep in project["dependencies"])
    return {normalize(m.group(0)) for m in names if m}


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level import name → the modules importing it (run-time imports only)."""
    base = package_dir()
    found: dict[str, list[str]] = {}
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for name in imported_names(path, module):
            top = name.split(".")[0]
            users = found.setdefault(top, [])
            if top != "vsockrpc" and top not in sys.stdlib_module_names and module not in users:
                users.append(module)
    return found


def test_every_runtime_import_is_a_base_dependency() -> None:
    provided = metadata.packages_distributions()
    declared = _base_dependencies()
    missing = {
        top: (provided.get(top), users[:3])
        for top, users in _third_party_imports().items()
        if users and not {normalize(d) for d in provided.get(top, [])} & declared
    }
    assert not missing, f"imported but not in [project].dependencies: {missing}"
