"""The layers of docs/architecture.md hold in the code: a static check of src/vsockrpc.

Parses every module (none of them is run) and collects its dependencies: every ``import`` and
``from ... import`` anywhere in the file (function-level and ``TYPE_CHECKING`` ones too),
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name, and
``[..., "-m", "pkg.mod", ...]`` argv lists (a child Python started on a module is a dependency
on it as much as an import is). ``from pkg import name`` where ``pkg/__init__.py`` re-exports
``name`` from a submodule counts as a dependency on that submodule, so a facade cannot hide an
edge. Then it checks the rules below, plus the size limits and the address-kind rule.

``KNOWN_VIOLATIONS`` lists what the code breaks today, each with the work that removes it. The
test requires the found violations to be exactly that set: it fails on a new violation, and on
an entry that no longer occurs (delete it: the set only ever shrinks).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import vsockrpc
from tests.unit.import_graph import Import, module_of, read_imports

SRC = Path(vsockrpc.__file__).resolve().parent  # src/vsockrpc
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 400


@dataclass(frozen=True)
class Rule:
    """Modules under any of ``importers`` (minus ``unless_importer``) must not depend on a
    module under any of ``forbidden`` (minus ``unless_target``). Names match a module and
    everything below it: ``vsockrpc.rpc`` covers ``vsockrpc.rpc.server``."""

    why: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    unless_importer: tuple[str, ...] = ()
    unless_target: tuple[str, ...] = ()


GRPC = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf")
SERVER_CODE = ("vsockrpc.services", "vsockrpc.guest", "vsockrpc.rpc.server")
CLIENT_CODE = ("vsockrpc.sdk", "vsockrpc.rpc.channel", "vsockrpc.rpc.aio")
# Leaves that host front ends and the guest (PID 1, agent, supervisor) share.
PROCESS_HELPERS = ("vsockrpc._fdlimit", "vsockrpc._stopsignals")
HOST_ONLY = (
    "vsockrpc.cli",
    "vsockrpc.bench",
    "vsockrpc.forward",
    "vsockrpc.vm",
    "vsockrpc.image",
    "vsockrpc.payload",
    "vsockrpc.bundle",
    "vsockrpc.vhost",
    "vsockrpc.sdk",
)

RULES = (
    Rule("the client never imports server code", CLIENT_CODE, SERVER_CODE),
    Rule(
        "the host launcher never imports guest code",
        ("vsockrpc.vm",),
        ("vsockrpc.guest", "vsockrpc.services"),
    ),
    Rule(
        "vhost/ is a device: no gRPC, no protobuf, no CLI",
        ("vsockrpc.vhost",),
        (*GRPC, "vsockrpc.rpc", "vsockrpc.services", "vsockrpc.proto", "vsockrpc.cli"),
    ),
    Rule(
        "transport/ sits below rpc/ and knows no gRPC",
        ("vsockrpc.transport",),
        (*GRPC, "vsockrpc.rpc", "vsockrpc.services", "vsockrpc.guest", *HOST_ONLY),
    ),
    Rule(
        "rpc/ is grpcio glue: it knows no services, guest, SDK or VMs",
        ("vsockrpc.rpc",),
        ("vsockrpc.services", "vsockrpc.guest", *HOST_ONLY),
    ),
    Rule(
        "services/ are servicers: the peer lookup is injected, not imported from rpc/",
        ("vsockrpc.services",),
        ("vsockrpc.rpc", "vsockrpc.guest", *HOST_ONLY),
    ),
    Rule("guest/ runs in the VM: no host code", ("vsockrpc.guest",), HOST_ONLY),
    Rule(
        "image/ packages the guest as files: it neither imports guest code nor runs VMs",
        ("vsockrpc.image",),
        ("vsockrpc.guest", "vsockrpc.services", "vsockrpc.rpc", *HOST_ONLY),
        unless_target=("vsockrpc.image", "vsockrpc.payload"),
    ),
    Rule(
        "payload/ names the guest's parts as files and pins: it imports only errors",
        ("vsockrpc.payload",),
        ("vsockrpc",),
        unless_target=("vsockrpc.payload", "vsockrpc.errors"),
    ),
    Rule(
        "the agent contract (agent/) is what both sides share: it imports only itself and proto/",
        ("vsockrpc.agent",),
        ("vsockrpc",),
        unless_target=("vsockrpc.agent", "vsockrpc.proto"),
    ),
    Rule(
        "proto/ is generated stubs: it imports only itself",
        ("vsockrpc.proto",),
        ("vsockrpc",),
        unless_target=("vsockrpc.proto",),
    ),
    Rule(
        "addresses, errors and the vsock constants are the bottom: they import only each other",
        ("vsockrpc.addresses", "vsockrpc.errors", "vsockrpc.vsock_constants"),
        ("vsockrpc",),
        unless_target=("vsockrpc.errors", "vsockrpc.vsock_constants"),
    ),
    Rule(
        "the shared argument checks (_checks) sit on the bottom: they import only errors",
        ("vsockrpc._checks",),
        ("vsockrpc", *GRPC),
        unless_target=("vsockrpc.errors",),
    ),
    Rule(
        "the process helpers both sides use (fd limit, stop signals) are standard library only",
        PROCESS_HELPERS,
        ("vsockrpc", *GRPC),
    ),
    Rule(
        "no library module imports cli/ (the CLI is a front end, nothing depends on it)",
        ("vsockrpc",),
        ("vsockrpc.cli",),
        # bench/ is a front end too: it starts `python -m vsockrpc.cli.main serve` to measure
        # the command as users run it.
        unless_importer=("vsockrpc.cli", "vsockrpc.bench"),
    ),
)

# Modules that may branch on the address kind (isinstance, match): the layer that owns kinds.
ADDRESS_KIND_OWNERS = ("vsockrpc.addresses", "vsockrpc.transport")

# What the code breaks today, each removed by the change named in its comment. Keys:
#   "import A -> B"   A depends on B across a rule above
#   "lines M"         module M has more than MAX_MODULE_LINES lines
#   "class M.C"       class C of module M has more than MAX_CLASS_LINES lines
#   "isinstance M"    module M branches on an address kind outside ADDRESS_KIND_OWNERS
KNOWN_VIOLATIONS: frozenset[str] = frozenset()


# --- reading the tree -----------------------------------------------------------------------


@dataclass(frozen=True)
class Codebase:
    """Module name -> source text, and which of the modules are packages (``__init__``)."""

    sources: dict[str, str]
    packages: frozenset[str]
    _trees: dict[str, ast.Module] = field(default_factory=dict, compare=False)

    def tree(self, name: str) -> ast.Module:
        if name not in self._trees:
            self._trees[name] = ast.parse(self.sources[name], filename=name)
        return self._trees[name]

    def imports(self, name: str) -> list[Import]:
        return read_imports(self.tree(name), name, name in self.packages)

    def resolve_from(self, base: str, name: str) -> str:
        """The module that ``from base import name`` really depends on: the submodule
        ``base.name``, the submodule a package re-exports ``name`` from, or ``base``."""
        if f"{base}.{name}" in self.sources:
            return f"{base}.{name}"
        if base in self.packages:
            for imp in self.imports(base):
                if (
                    imp.how == "from"
                    and imp.top_level
                    and imp.module.startswith(base + ".")
                    and name in imp.bound
                ):
                    return self.resolve_from(imp.module, name)
        return base

    def dependencies(self, importer: str) -> set[str]:
        found: set[str] = set()
        for imp in self.imports(importer):
            if imp.how == "from":
                found.update(self.resolve_from(imp.module, name) for name in imp.names)
            else:
                found.add(imp.module)
        found.discard(importer)
        return found


def read_codebase(root: Path = SRC) -> Codebase:
    sources: dict[str, str] = {}
    packages: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        name, is_package = module_of(path, root)
        if is_package:
            packages.add(name)
        sources[name] = path.read_text(encoding="utf-8")
    return Codebase(sources, frozenset(packages))


def _generated(name: str) -> bool:
    return name.rsplit(".", 1)[-1].endswith(("_pb2", "_pb2_grpc"))


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# --- the checks -----------------------------------------------------------------------------


def import_violations(code: Codebase, rules: tuple[Rule, ...] = RULES) -> dict[str, list[str]]:
    """``"import A -> B"`` for each forbidden edge, with the rules it breaks."""
    found: dict[str, list[str]] = {}
    for importer in code.sources:
        if _generated(importer):
            continue
        for target in sorted(code.dependencies(importer)):
            for rule in rules:
                if (
                    _under(importer, rule.importers)
                    and not _under(importer, rule.unless_importer)
                    and _under(target, rule.forbidden)
                    and not _under(target, rule.unless_target)
                ):
                    found.setdefault(f"import {importer} -> {target}", []).append(rule.why)
    return found


def size_violations(code: Codebase) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, source in code.sources.items():
        if _generated(name):
            continue
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            found[f"lines {name}"] = [f"{lines} lines > {MAX_MODULE_LINES}"]
        for node in ast.walk(code.tree(name)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    found[f"class {name}.{node.name}"] = [f"{length} lines > {MAX_CLASS_LINES}"]
    return found


def _names_an_address_kind(node: ast.expr) -> bool:
    if isinstance(node, ast.Tuple):
        return any(_names_an_address_kind(e) for e in node.elts)
    if isinstance(node, ast.BinOp):  # isinstance(x, A | B)
        return _names_an_address_kind(node.left) or _names_an_address_kind(node.right)
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return isinstance(name, str) and name.endswith("Address")


def address_kind_violations(code: Codebase) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name in code.sources:
        if _generated(name) or _under(name, ADDRESS_KIND_OWNERS):
            continue
        for node in ast.walk(code.tree(name)):
            branches = (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", "") == "isinstance"
                and len(node.args) == 2
                and _names_an_address_kind(node.args[1])
            ) or (isinstance(node, ast.MatchClass) and _names_an_address_kind(node.cls))
            if branches:
                found.setdefault(f"isinstance {name}", []).append(f"line {node.lineno}")
    return found


def test_layers_sizes_and_address_kinds_match_known_violations() -> None:
    code = read_codebase()
    found = {**import_violations(code), **size_violations(code), **address_kind_violations(code)}
    new = sorted(set(found) - KNOWN_VIOLATIONS)
    stale = sorted(KNOWN_VIOLATIONS - set(found))
    report = [f"new violation: {key} ({'; '.join(found[key])})" for key in new]
    report += [f"stale KNOWN_VIOLATIONS entry, now fixed (delete it): {key}" for key in stale]
    assert not report, "\n".join(report)


# --- the checker checks itself --------------------------------------------------------------


def test_the_scan_reads_the_whole_tree() -> None:
    code = read_codebase()
    assert {"vsockrpc", "vsockrpc.errors", "vsockrpc.cli.main", "vsockrpc.rpc.server"} <= set(
        code.sources
    )
    assert "vsockrpc.rpc" in code.packages and "vsockrpc.rpc.server" not in code.packages
    assert _generated("vsockrpc.proto.vsock_service_pb2_grpc") and not _generated("vsockrpc.proto")
    assert {"vsockrpc.cli.agent", "vsockrpc.errors", "argparse"} <= code.dependencies(
        "vsockrpc.cli.main"
    )


def test_every_kind_of_edge_is_seen() -> None:
    code = Codebase(
        {
            "vsockrpc": "",
            "vsockrpc.rpc": "from vsockrpc.rpc.server import serve as serve\n",
            "vsockrpc.rpc.server": "def serve(): ...\n",
            "vsockrpc.cli": "",
            "vsockrpc.cli.main": "",
            "vsockrpc.transport": "",
            "vsockrpc.transport.unix": "",
            "vsockrpc.transport.vsock": (
                "import subprocess, sys\n"
                "from . import unix\n"
                "from vsockrpc.rpc import serve\n"
                "def later():\n"
                "    from ..cli import main\n"
                "    import importlib\n"
                "    importlib.import_module('vsockrpc.guest')\n"
                "    subprocess.run([sys.executable, '-m', 'vsockrpc.cli.main'])\n"
            ),
        },
        frozenset({"vsockrpc", "vsockrpc.rpc", "vsockrpc.cli", "vsockrpc.transport"}),
    )
    assert code.dependencies("vsockrpc.transport.vsock") == {
        "subprocess",
        "sys",
        "importlib",
        "vsockrpc.transport.unix",  # relative, from a module of a package
        "vsockrpc.rpc.server",  # through the rpc facade's re-export
        "vsockrpc.cli.main",  # function-level relative import, and python -m
        "vsockrpc.guest",  # import_module with a literal
    }
    assert set(import_violations(code)) == {
        "import vsockrpc.transport.vsock -> vsockrpc.rpc.server",
        "import vsockrpc.transport.vsock -> vsockrpc.cli.main",
        "import vsockrpc.transport.vsock -> vsockrpc.guest",
    }


def test_sizes_and_address_kinds_are_seen() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_CLASS_LINES))
    code = Codebase(
        {
            "vsockrpc.big": "class Big:\n" + body,
            "vsockrpc.big_pb2": "\n" * (MAX_MODULE_LINES + 1),
            "vsockrpc.sdk": (
                "def f(a):\n"
                "    if isinstance(a, (int, addresses.UnixAddress)): ...\n"
                "    if isinstance(a, TcpAddress | HybridAddress): ...\n"
                "    if isinstance(a, str): ...\n"
                "    match a:\n"
                "        case VsockAddress(cid=3): ...\n"
            ),
            "vsockrpc.transport.vsock": "isinstance(a, VsockAddress)\n",
        },
        frozenset(),
    )
    assert size_violations(code) == {"class vsockrpc.big.Big": ["401 lines > 400"]}
    assert address_kind_violations(code) == {
        "isinstance vsockrpc.sdk": ["line 2", "line 3", "line 6"]
    }
