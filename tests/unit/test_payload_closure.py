"""The guest's import closure stays inside the payload: what ``python -m vsockrpc.guest``
(PID 1 and the agent server it starts) imports, transitively, is shipped, and nothing else
it needs comes from outside the standard library and the payload's distributions."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.unit.import_graph import import_closure, imported_names, read_imports
from vsockrpc import payload
from vsockrpc.payload import ENTRY_MODULE, GUEST_DISTRIBUTIONS, guest_payload

PACKAGE_DIR = payload.package_dir()
# Host-only layers: never in a guest (ARCHITECTURE.md).
HOST_ONLY = ("cli", "vm", "image", "vhost", "sdk", "payload", "bundle")


def _module_name(dest: str) -> str:
    name = dest.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def test_guest_import_closure_is_inside_the_payload() -> None:
    closure = import_closure(PACKAGE_DIR, [ENTRY_MODULE])
    shipped = {_module_name(f.dest) for f in guest_payload().sources}
    outside = sorted(set(closure.modules) - shipped)
    assert not outside, (
        f"the guest imports {outside}, which the payload does not ship: "
        "add their top-level package to vsockrpc.payload GUEST_PARTS"
    )
    # The walk followed the deferred imports: PID 1 → agent server → servicers → grpc.
    assert "vsockrpc.services" in closure.modules
    assert {"grpc", "grpc_health", "grpc_reflection", "google"} <= closure.external


def test_guest_third_party_imports_come_from_the_payload_distributions() -> None:
    closure = import_closure(PACKAGE_DIR, [ENTRY_MODULE])
    provided = metadata.packages_distributions()
    allowed = {payload.normalize(d) for d in GUEST_DISTRIBUTIONS}
    foreign = {
        top: provided.get(top)
        for top in closure.external - set(sys.stdlib_module_names)
        if not {payload.normalize(d) for d in provided.get(top, [])} & allowed
    }
    assert not foreign, f"the guest imports packages the payload does not carry: {foreign}"


def test_payload_ships_no_host_only_layer() -> None:
    dests = [f.dest for f in guest_payload().sources]
    for layer in HOST_ONLY:
        assert not [d for d in dests if d.startswith(f"vsockrpc/{layer}")], layer
    assert "qemu-qmp" not in {payload.normalize(d) for d in GUEST_DISTRIBUTIONS}


def test_walker_sees_deferred_relative_and_dynamic_imports_but_not_type_checking(
    tmp_path: Path,
) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import helper\n")
    (pkg / "sub" / "helper.py").write_text("X = 1\n")
    (pkg / "late.py").write_text("import json\n")
    (pkg / "dyn.py").write_text("")
    (pkg / "typing_only.py").write_text("")
    (pkg / "main.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg import typing_only\n"
        "def run():\n    from pkg.sub import X\n    from .late import thing\n"
        "    import importlib\n    importlib.import_module('pkg.dyn')\n"
    )
    closure = import_closure(pkg, ["pkg.main"])
    assert set(closure.modules) == {
        "pkg",
        "pkg.main",
        "pkg.sub",
        "pkg.sub.helper",
        "pkg.late",
        "pkg.dyn",
    }
    assert {"json", "importlib", "typing"} <= closure.external
    assert "pkg.sub.X" in imported_names(pkg / "main.py", "pkg.main")
    (pkg / "main.py").write_text("import pkg.gone\n")
    with pytest.raises(LookupError, match=r"pkg\.gone"):
        import_closure(pkg, ["pkg.main"])


def test_the_shared_reader_marks_where_each_import_sits() -> None:
    source = (
        "import a\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
        "class K:\n    from .d import e as f\n"
        "def run():\n    import g\n    __import__('h')\n    x = ['python', '-m', 'pkg.i']\n"
    )
    seen = {
        (i.module, i.how, i.top_level, i.deferred, i.type_checking, i.names, i.bound)
        for i in read_imports(source, "pkg.sub.mod")
    }
    assert seen == {
        ("a", "import", True, False, False, (), ()),
        ("typing", "from", True, False, False, ("TYPE_CHECKING",), ("TYPE_CHECKING",)),
        ("b", "import", False, False, True, (), ()),
        ("c", "import", False, False, False, (), ()),
        ("pkg.sub.d", "from", False, False, False, ("e",), ("f",)),
        ("g", "import", False, True, False, (), ()),
        ("h", "__import__", False, True, False, (), ()),
        ("pkg.i", "-m", False, True, False, (), ()),
    }
    assert read_imports("from . import x\n", "pkg.sub", is_package=True)[0].module == "pkg.sub"
