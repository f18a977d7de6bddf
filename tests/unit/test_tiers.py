"""Tier markers come from the path under tests/, never from folders above the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import conftest


def test_tier_is_the_first_folder_under_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkout inside a folder named "vm" (and "unit") used to mark every test of it "vm".
    root = Path("/srv/vm/unit/checkout/tests")
    monkeypatch.setattr(conftest, "TESTS", root)
    assert conftest.tier_of(root / "unit" / "test_x.py") == "unit"
    assert conftest.tier_of(root / "integration" / "test_x.py") == "integration"
    assert conftest.tier_of(root / "vm" / "test_x.py") == "vm"
    assert conftest.tier_of(root / "test_top.py") is None
    assert conftest.tier_of(root / "helpers" / "vm" / "test_x.py") is None
    assert conftest.tier_of(Path("/srv/vm/other/test_x.py")) is None


def test_this_file_is_marked_unit(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("vm") is None


def test_unit_guard_refuses_sockets_and_processes() -> None:
    import os
    import socket
    import subprocess

    import grpc
    import grpc.aio
    from _pytest.outcomes import Failed

    with pytest.raises(Failed, match="opened a socket"):
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(Failed, match="opened a socket"):
        socket.socketpair()
    with pytest.raises(Failed, match="started a process"):
        subprocess.run(["true"], check=False)
    with pytest.raises(Failed, match="started a process"):
        os.fork()
    with pytest.raises(Failed, match="started a gRPC server"):
        grpc.server(None)  # type: ignore[arg-type]
    with pytest.raises(Failed, match="opened a gRPC channel"):
        grpc.aio.insecure_channel("unix:/nonexistent")
