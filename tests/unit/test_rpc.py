"""rpc/ logic without a server: peer strings, native-vsock probe, the Addition arithmetic."""

from __future__ import annotations

import os

import pytest

from vsockrpc.addresses import TcpAddress, UnixAddress, VsockAddress
from vsockrpc.rpc import _native, _peers
from vsockrpc.rpc._private import PrivateDir
from vsockrpc.services.addition import INT32_MAX, INT32_MIN, add_int32


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:127.0.0.1:50051", TcpAddress("127.0.0.1", 50051)),
        ("ipv6:[::1]:443", TcpAddress("::1", 443)),
        ("ipv6:%5B::1%5D:443", TcpAddress("::1", 443)),
        ("vsock:2:1034", VsockAddress(2, 1034)),
        ("unix:/run/client.sock", UnixAddress("/run/client.sock")),
        ("unix:", None),
        ("unix-abstract:whatever", None),
        ("ipv4:garbage", None),
        ("vsock:x:1", None),
        ("", None),
    ],
)
def test_parse_peer(peer: str, expected: object) -> None:
    assert _peers.parse_peer(peer) == expected


def test_relay_client_names_decode_only_in_trusted_directories() -> None:
    with PrivateDir() as private:
        name = _peers.client_name(private.path, VsockAddress(2, 51234))
        assert len(name.encode()) <= 107
        assert os.path.dirname(name) == private.path
        # Untrusted directory: just a Unix peer, never a forged vsock identity.
        assert _peers.parse_peer(f"unix:{name}") == UnixAddress(name)
        _peers.trust_directory(private.path)
        try:
            assert _peers.parse_peer(f"unix:{name}") == VsockAddress(2, 51234)
            unknown = _peers.client_name(private.path, None)
            assert _peers.parse_peer(f"unix:{unknown}") is None
            assert _peers.parse_peer(f"unix:{private.path}/c1-vsock-2-x") is None
        finally:
            _peers.untrust_directory(private.path)
        assert _peers.parse_peer(f"unix:{name}") == UnixAddress(name)


def test_client_names_are_unique() -> None:
    names = {_peers.client_name("/d", VsockAddress(3, 1)) for _ in range(100)}
    assert len(names) == 100


def test_private_dir_is_0700_and_removed_with_its_sockets() -> None:
    private = PrivateDir()
    assert os.stat(private.path).st_mode & 0o777 == 0o700
    with open(private.join("leftover"), "w"):
        pass
    private.close()
    assert not os.path.exists(private.path)
    private.close()  # idempotent


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("1", True)])
def test_native_vsock_override(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("VSOCKRPC_NATIVE_VSOCK", value)
    _native.native_vsock_supported.cache_clear()
    try:
        assert _native.native_vsock_supported() is expected
    finally:
        _native.native_vsock_supported.cache_clear()


@pytest.mark.parametrize(
    ("a", "b", "c"),
    [
        (5, 7, 12),
        (-5, 7, 2),
        (INT32_MAX, 0, INT32_MAX),
        (INT32_MAX, INT32_MIN, -1),
        (INT32_MIN, 0, INT32_MIN),
        (INT32_MAX, 1, None),
        (INT32_MIN, -1, None),
        (INT32_MAX, INT32_MAX, None),
    ],
)
def test_add_int32(a: int, b: int, c: int | None) -> None:
    assert add_int32(a, b) == c
