"""Which bundled wheels the bootstrap picks for an interpreter (the build side, which pip
resolves, is in tests/integration/test_payload_wheels.py with the same wheel names)."""

from __future__ import annotations

import pytest

from vsockrpc import _bundle_main as bootstrap

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
