"""The payload's rules: one pinning rule, one declared source list, deterministic layout."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest

from vsockrpc.errors import PayloadError
from vsockrpc.payload import (
    GUEST_DISTRIBUTIONS,
    Payload,
    SourceFile,
    Target,
    guest_payload,
    pinned_versions,
    source_files,
)


def test_pins_come_from_constraints_else_from_what_is_installed(tmp_path: Path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        "# pins\nGRPCIO == 1.2.3  # comment\nprotobuf>=1\nTyping_Extensions==9.9\n"
    )
    pins = pinned_versions(("grpcio", "protobuf", "typing-extensions"), constraints=constraints)
    assert pins == {
        "grpcio": "1.2.3",
        "protobuf": metadata.version("protobuf"),  # not an == pin: the installed version
        "typing-extensions": "9.9",
    }
    with pytest.raises(PayloadError, match="no-such-dist"):
        pinned_versions(("no_such.dist",), constraints=constraints)


def test_guest_payload_pins_every_guest_distribution_in_order() -> None:
    payload = guest_payload()
    assert list(payload.pins) == list(GUEST_DISTRIBUTIONS)
    assert payload.requirements[0] == f"grpcio=={payload.pins['grpcio']}"


def test_sources_are_the_declared_parts_only() -> None:
    dests = [f.dest for f in source_files(("errors", "transport"))]
    assert dests == sorted(dests)
    assert dests[:2] == ["vsockrpc/__init__.py", "vsockrpc/errors.py"]
    assert "vsockrpc/transport/__init__.py" in dests
    assert all(d.endswith(".py") and "__pycache__" not in d for d in dests)
    assert not [d for d in dests if d.startswith(("vsockrpc/rpc", "vsockrpc/addresses"))]
    with pytest.raises(PayloadError, match=r"vsockrpc\.nowhere does not exist"):
        source_files(("nowhere",))


def test_write_sources_is_independent_of_umask_and_source_modes(tmp_path: Path) -> None:
    src = tmp_path / "src.py"
    src.write_text("x = 1\n")
    src.chmod(0o600)
    payload = Payload(pins={}, sources=(SourceFile("vsockrpc/a/b/c.py", src),))
    old = os.umask(0o077)
    try:
        payload.write_sources(tmp_path / "site")
    finally:
        os.umask(old)
    site = tmp_path / "site"
    assert (site / "vsockrpc/a/b/c.py").read_text() == "x = 1\n"
    modes = {p.relative_to(site).as_posix(): p.stat().st_mode & 0o777 for p in site.rglob("*")}
    assert modes == {
        "vsockrpc": 0o755,
        "vsockrpc/a": 0o755,
        "vsockrpc/a/b": 0o755,
        "vsockrpc/a/b/c.py": 0o644,
    }


def test_source_digest_follows_content_and_names(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("x = 1\n")
    one = Payload(pins={}, sources=(SourceFile("vsockrpc/m.py", src),))
    first = one.source_digest()
    assert Payload(pins={"grpcio": "1"}, sources=one.sources).source_digest() == first
    assert Payload(pins={}, sources=(SourceFile("vsockrpc/n.py", src),)).source_digest() != first
    src.write_text("x = 2\n")
    assert one.source_digest() != first


def test_target_validates_python_and_machine() -> None:
    assert Target("3.12").platforms == ("manylinux2014_x86_64", "manylinux_2_17_x86_64")
    with pytest.raises(PayloadError, match="unsupported Python"):
        Target("3.9")
    with pytest.raises(PayloadError, match="unsupported Python"):
        Target("three")
    with pytest.raises(PayloadError, match="riscv64"):
        Target("3.12", "riscv64")
