"""rpc/'s native-vsock probe, which starts a grpc server to ask grpcio whether it can bind
vsock (moved here from the unit tier, which starts no server)."""

from __future__ import annotations

import pytest

from vsockrpc.rpc import _native


@pytest.mark.timeout(30)
def test_native_vsock_probe_is_silent_and_cached(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VSOCKRPC_NATIVE_VSOCK", raising=False)
    _native.native_vsock_supported.cache_clear()
    try:
        first = _native.native_vsock_supported()
        assert _native.native_vsock_supported() is first
        assert _native.native_vsock_supported.cache_info().hits >= 1
        # PyPI grpcio wheels are built without vsock: that is what this machine has.
        assert first is False
        captured = capfd.readouterr()
        assert "add_port" not in captured.err
        assert "VSOCK" not in captured.err
    finally:
        _native.native_vsock_supported.cache_clear()
