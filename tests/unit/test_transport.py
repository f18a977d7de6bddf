"""Transport logic that needs no connection: sockaddrs, reply parsing, AF_VSOCK listen.

SAFETY: nothing here calls connect() on an AF_VSOCK socket (see DEVELOPERS.md / COMMON.md).
"""

from __future__ import annotations

import errno
import socket

import pytest

from vsockrpc import transport
from vsockrpc.addresses import VMADDR_CID_ANY, HybridAddress, VsockAddress, parse_address
from vsockrpc.errors import (
    AddressError,
    ConnectError,
    NotReadyError,
    TransportError,
    TransportTimeout,
)
from vsockrpc.transport import hybrid, vsock
from vsockrpc.transport._errors import mapping_connect_errors, mapping_listen_errors

HAS_VSOCK = hasattr(socket, "AF_VSOCK")


def test_vsock_listen_sockaddr_maps_port_zero_to_port_any() -> None:
    assert vsock.sockaddr_for_listen(VsockAddress(VMADDR_CID_ANY, 0)) == (
        VMADDR_CID_ANY,
        vsock.VMADDR_PORT_ANY,
    )
    assert vsock.sockaddr_for_listen(VsockAddress(3, 9999)) == (3, 9999)


def test_vsock_connect_sockaddr_is_cid_port() -> None:
    assert vsock.sockaddr_for_connect(VsockAddress(3, 9999)) == (3, 9999)
    assert vsock.sockaddr_for_connect(parse_address("vsock:2:1024")) == (2, 1024)  # type: ignore[arg-type]


def test_vsock_connect_to_cid_any_is_an_address_error_before_any_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_socket(*_args: object) -> None:
        raise AssertionError("a socket was created")

    monkeypatch.setattr(vsock, "_new_socket", no_socket)
    with pytest.raises(AddressError, match="only for listening"):
        transport.connect("vsock:-1:9999")
    with pytest.raises(AddressError):
        transport.connect(VsockAddress(VMADDR_CID_ANY, 1), timeout=1)


@pytest.mark.skipif(not HAS_VSOCK, reason="no AF_VSOCK in this Python")
def test_vsock_listen_on_cid_any_picks_a_port() -> None:
    try:
        sock = transport.listen("vsock:-1:0")
    except TransportError as err:
        pytest.skip(f"AF_VSOCK unavailable: {err}")
    with sock:
        assert sock.family == socket.AF_VSOCK
        cid, port = sock.getsockname()
        assert cid == VMADDR_CID_ANY
        assert port not in (0, vsock.VMADDR_PORT_ANY)
        # It really listens: a second bind on the same port is refused.
        with pytest.raises(TransportError, match="cannot listen on vsock:-1"):
            transport.listen(VsockAddress(VMADDR_CID_ANY, port)).close()


@pytest.mark.parametrize(
    ("line", "port"),
    [
        (b"OK 1073741824", 1073741824),
        (b"OK 9999", 9999),
        (b"OK 0", 0),
        (b"OK 4294967295\r", 4294967295),
        (b"OK", None),
        (b"OK ", None),
        (b"ok 5", None),
        (b"OK -5", None),
        (b"OK 5 6", None),
        (b"OK 12345678901", None),
        (b"connect refused", None),
        (b"HELLO", None),
        (b"", None),
    ],
)
def test_hybrid_parse_reply(line: bytes, port: int | None) -> None:
    assert hybrid.parse_reply(line) == port


def test_hybrid_listen_path_follows_firecracker_convention() -> None:
    assert hybrid.listen_path_for(HybridAddress("/run/vm.vsock", 52)) == "/run/vm.vsock_52"
    with pytest.raises(AddressError, match="longer than"):
        hybrid.listen_path_for(HybridAddress("/" + "a" * 100, 4294967295))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), NotReadyError),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), NotReadyError),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), NotReadyError),
        (TimeoutError("timed out"), TransportTimeout),
        (OSError(errno.EHOSTUNREACH, "No route to host"), ConnectError),
        (PermissionError(errno.EACCES, "Permission denied"), ConnectError),
    ],
)
def test_connect_errors_are_mapped_and_chained(exc: OSError, expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, mapping_connect_errors("unix:/x"):
        raise exc
    assert type(info.value) is expected
    assert info.value.__cause__ is exc
    assert "unix:/x" in str(info.value)


def test_connect_error_mapping_passes_our_own_errors_through() -> None:
    own = TransportTimeout("handshake timed out")
    with pytest.raises(TransportTimeout) as info, mapping_connect_errors("x"):
        raise own
    assert info.value is own


def test_listen_errors_carry_a_hint() -> None:
    with pytest.raises(TransportError) as info, mapping_listen_errors("tcp:127.0.0.1:80"):
        raise OSError(errno.EADDRINUSE, "Address already in use")
    assert info.value.hint and "another process" in info.value.hint
