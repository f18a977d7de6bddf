"""Why the rpc part's C++ reference line cannot be built: one line naming what to install."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from vsockrpc.bench import _cpp
from vsockrpc.errors import VsockRpcError


def _pkg_config_without(absent: str) -> object:
    def out(argv: list[str]) -> str:
        if argv[:2] == ["pkg-config", "--exists"] and argv[2] == absent:
            raise subprocess.CalledProcessError(1, argv)
        return ""

    return out


@pytest.mark.parametrize(
    ("absent", "package"), [("protobuf", "libprotobuf-dev"), ("grpc++", "libgrpc++-dev")]
)
def test_a_missing_development_package_is_named(
    monkeypatch: pytest.MonkeyPatch, absent: str, package: str
) -> None:
    monkeypatch.setattr(_cpp.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(_cpp, "_out", _pkg_config_without(absent))
    assert _cpp.missing() == f"pkg-config finds no {absent} development files (Debian: {package})"


def test_nothing_is_missing_when_every_module_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpp.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(_cpp, "_out", _pkg_config_without("none"))
    assert _cpp.missing() is None


def test_missing_tools_are_named_with_every_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpp.shutil, "which", lambda tool: None if tool == "protoc" else tool)
    reason = _cpp.missing()
    assert reason is not None and reason.startswith("protoc not found (Debian: ")
    assert "libprotobuf-dev" in reason and "libgrpc++-dev" in reason


@pytest.mark.parametrize(
    ("gxx", "why"),
    [
        (None, "g++ not found (Debian: g++)"),
        ("/usr/bin/g++", "building the C++ reference failed: g++: boom"),
    ],
)
def test_a_reference_line_that_cannot_be_built_is_a_note(
    monkeypatch: pytest.MonkeyPatch, gxx: str | None, why: str
) -> None:
    monkeypatch.setattr(_cpp.shutil, "which", lambda tool: gxx)
    notes: list[str] = []

    def build(progress: object) -> Path:
        assert gxx is not None, "nothing is built without g++"
        raise VsockRpcError(why)

    assert _cpp.optional_reference(build, "hand-offs", print, notes) is None
    assert notes == [f"no hand-offs line: {why}"]


def test_a_built_reference_line_adds_no_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpp.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    notes: list[str] = []
    steps: list[str] = []

    def build(progress: Callable[[str], None]) -> Path:
        progress("compiling")
        return Path("/cache/handoffs")

    assert _cpp.optional_reference(build, "hand-offs", steps.append, notes) == Path(
        "/cache/handoffs"
    )
    assert notes == [] and steps == ["compiling"]
