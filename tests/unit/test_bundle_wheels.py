"""Which bundled wheels fit which interpreter (build side and bootstrap side agree)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockrpc import _bundle_main as bootstrap
from vsockrpc.bundle import _select
from vsockrpc.errors import BundleError

GRPC311 = "grpcio-1.85.3-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
GRPC312 = "grpcio-1.85.3-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
PROTOBUF = "protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl"
HEALTH = "grpcio_health_checking-1.85.1-py3-none-any.whl"
ARM = "grpcio-1.85.3-cp311-cp311-manylinux2014_aarch64.whl"


def test_bootstrap_picks_matching_cpython_abi3_and_pure_wheels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bootstrap.platform, "machine", lambda: "x86_64")
    assert bootstrap._compatible(GRPC311, "cp311")
    assert not bootstrap._compatible(GRPC312, "cp311")
    assert bootstrap._compatible(PROTOBUF, "cp311") and bootstrap._compatible(PROTOBUF, "cp313")
    assert not bootstrap._compatible(PROTOBUF, "cp39")
    assert bootstrap._compatible(HEALTH, "cp314")
    assert not bootstrap._compatible(ARM, "cp311")


def test_build_side_selection(tmp_path: Path) -> None:
    for name in (GRPC311, GRPC312, PROTOBUF, HEALTH, ARM):
        (tmp_path / name).write_bytes(b"")
    assert _select(tmp_path, "grpcio==1.85.3", "3.12") == tmp_path / GRPC312
    assert _select(tmp_path, "grpcio==1.85.3", "3.13") is None
    assert _select(tmp_path, "grpcio==1.85.2", "3.11") is None
    assert _select(tmp_path, "protobuf==7.36.2", "3.14") == tmp_path / PROTOBUF
    assert _select(tmp_path, "grpcio-health-checking==1.85.1", None) == tmp_path / HEALTH
    with pytest.raises(BundleError, match="unsupported Python"):
        _select(tmp_path, "grpcio==1.85.3", "3.9")
