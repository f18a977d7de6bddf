"""The agent contract: both sides import it and never each other; it stays light and stable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vsockrpc
from tests.unit.import_graph import module_of, read_imports

PACKAGE = Path(vsockrpc.__file__).parent
HOST_SIDE = ("sdk", "vm")
GUEST_SIDE = ("services", "guest")


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved)."""
    found: set[str] = set()
    for imp in read_imports(path.read_text(), *module_of(path, PACKAGE)):
        if imp.how in ("import", "from"):
            found.add(imp.module)
            found.update(f"{imp.module}.{name}" for name in imp.names)
    return found


def _modules(*subpackages: str) -> list[Path]:
    return sorted(p for sub in subpackages for p in (PACKAGE / sub).rglob("*.py"))


def _offending(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in files
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_host_side_imports_no_guest_code() -> None:
    forbidden = tuple(f"vsockrpc.{side}" for side in GUEST_SIDE)
    assert _offending(_modules(*HOST_SIDE), forbidden) == []


def test_guest_side_imports_no_host_code() -> None:
    forbidden = tuple(f"vsockrpc.{side}" for side in HOST_SIDE)
    assert _offending(_modules(*GUEST_SIDE), forbidden) == []


def test_contract_imports_nothing_of_either_side() -> None:
    forbidden = tuple(f"vsockrpc.{side}" for side in (*HOST_SIDE, *GUEST_SIDE, "rpc", "cli"))
    assert _offending(_modules("agent"), forbidden) == []


def test_servicers_get_the_peer_lookup_injected() -> None:
    assert _offending(_modules("services/agent"), ("vsockrpc.rpc", "vsockrpc.transport")) == []


@pytest.mark.parametrize("name", ["process", "spawn"])
def test_process_manager_is_free_of_grpc(name: str) -> None:
    path = PACKAGE / "services" / "agent" / f"{name}.py"
    assert _offending([path], ("grpc", "google.protobuf", "vsockrpc.agent.v1")) == []
    status = PACKAGE / "services" / "agent" / "_status.py"
    assert _offending([status], ("grpc",)) == []


def test_agent_wire_names_are_unchanged() -> None:
    from vsockrpc.agent.v1 import agent_pb2 as pb

    assert pb.DESCRIPTOR.package == "vsockrpc.agent.v1"
    assert pb.DESCRIPTOR.name == "vsockrpc/agent/v1/agent.proto"  # beside its package's code
    names = {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()}
    assert names == {
        "vsockrpc.agent.v1.Exec",
        "vsockrpc.agent.v1.Files",
        "vsockrpc.agent.v1.System",
    }
    upload = pb.DESCRIPTOR.services_by_name["Files"].methods_by_name["Upload"]
    assert upload.input_type.full_name == "vsockrpc.agent.v1.UploadRequest"
    assert pb.UploadHeader.DESCRIPTOR.fields_by_name["ticket"].number == 8


def test_ticket_line_round_trip() -> None:
    from vsockrpc.agent.datachannel import (
        TICKET_BYTES,
        TICKET_LINE_MAX,
        new_ticket,
        parse_ticket_line,
        ticket_line,
    )

    ticket = new_ticket()
    assert len(ticket) == 2 * TICKET_BYTES and int(ticket, 16) >= 0
    line = ticket_line(ticket)
    assert len(line) == TICKET_LINE_MAX and line.endswith(b"\n")
    assert parse_ticket_line(line) == ticket
    assert new_ticket() != ticket


@pytest.mark.parametrize("subpackage", ["agent", "sdk", "services"])
def test_modules_and_classes_stay_small(subpackage: str) -> None:
    too_big = []
    for path in _modules(subpackage):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue  # generated
        text = path.read_text()
        if text.count("\n") > 500:
            too_big.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > 400:
                    too_big.append(f"{path.relative_to(PACKAGE)}: class {node.name} {length}")
    assert too_big == []
