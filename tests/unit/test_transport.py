"""Transport logic that needs no socket: sockaddrs, reply parsing, per-kind behaviour (the
socket-using transport tests are in tests/integration/test_transport_sockets.py).

SAFETY: nothing here calls connect() on an AF_VSOCK socket (see DEVELOPERS.md / COMMON.md).
"""

from __future__ import annotations

import ast
import errno
import pathlib
import socket
from typing import Any

import pytest

import vsockrpc
from vsockrpc import transport
from vsockrpc.addresses import (
    VMADDR_CID_ANY,
    HybridAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
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


# ---- each address kind carries its behaviour ------------------------------------------------


class _Accepted:
    """Stands in for an accepted socket: accepted_peer only looks at its family."""

    def __init__(self, family: int) -> None:
        self.family = family


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("unix:/run/x.sock", "unix:/run/x.sock"),
        ("unix:rel.sock", "unix:rel.sock"),
        ("unix:////odd", "unix:////odd"),  # never read as an authority
        ("tcp:127.0.0.1:80", "127.0.0.1:80"),
        ("tcp:[::1]:80", "[::1]:80"),
        ("vsock:3:9999", "vsock:3:9999"),
        ("hvsock:/run/vm.sock:9999", None),  # no grpcio speaks CONNECT: relayed
    ],
)
def test_grpc_target_per_kind(text: str, target: str | None) -> None:
    assert transport.grpc_target(parse_address(text)) == target


def test_grpc_target_refuses_cid_any() -> None:
    with pytest.raises(AddressError, match="only for listening"):
        transport.grpc_target(VsockAddress(VMADDR_CID_ANY, 1))


def test_accepted_peer_per_kind() -> None:
    vsock_family = getattr(socket, "AF_VSOCK", 40)
    conn: Any = _Accepted(vsock_family)
    assert transport.accepted_peer(VsockAddress(VMADDR_CID_ANY, 9), conn, (2, 1034)) == (
        VsockAddress(2, 1034)
    )
    unix_conn: Any = _Accepted(socket.AF_UNIX)
    # A hybrid listener is reached by the device on the guest's behalf: no address to tell.
    assert transport.accepted_peer(HybridAddress("/d", 9), unix_conn, "") is None
    assert transport.accepted_peer(UnixAddress("/s"), unix_conn, "") == UnixAddress("")
    assert transport.accepted_peer(UnixAddress("/s"), unix_conn, "/c") == UnixAddress("/c")
    tcp_conn: Any = _Accepted(socket.AF_INET)
    assert transport.accepted_peer(TcpAddress("h", 1), tcp_conn, ("10.0.0.1", 5)) == (
        TcpAddress("10.0.0.1", 5)
    )


def test_sibling_is_the_same_peer_elsewhere() -> None:
    assert transport.sibling(HybridAddress("/d", 9999), port=1025) == HybridAddress("/d", 1025)
    assert transport.sibling(VsockAddress(3, 9999), port=1025) == VsockAddress(3, 1025)
    assert transport.sibling(TcpAddress("h", 1), port=2) == TcpAddress("h", 2)
    assert transport.sibling(UnixAddress("/a"), path="/b") == UnixAddress("/b")
    # What a kind can't use gives None (an agent reply without a port or path).
    assert transport.sibling(VsockAddress(3, 9999), path="/b") is None
    assert transport.sibling(UnixAddress("/a"), port=5) is None


def test_callback_address_per_kind() -> None:
    def path() -> str:
        return "/private/data.sock"

    assert transport.callback_address(VsockAddress(2, 1034), path) == VsockAddress(
        VMADDR_CID_ANY, 0
    )
    assert transport.callback_address(UnixAddress(""), path) == UnixAddress("/private/data.sock")
    assert transport.callback_address(TcpAddress("h", 1), path) is None
    assert transport.callback_address(HybridAddress("/d", 1), path) is None


def test_every_kind_has_a_transport() -> None:
    for text in ("vsock:3:1", "hvsock:/x:1", "unix:/x", "tcp:h.x:1"):
        address = parse_address(text)
        assert transport.transport_for(address).scheme == address.scheme


# ---- the layering rules this module's interface exists for ---------------------------------

_SRC = pathlib.Path(vsockrpc.__file__).parent
_ADDRESS_CLASSES = {"VsockAddress", "HybridAddress", "UnixAddress", "TcpAddress"}


def _outside_transport_layer() -> list[pathlib.Path]:
    return [
        path
        for path in sorted(_SRC.rglob("*.py"))
        if path.name != "addresses.py" and "transport" not in path.relative_to(_SRC).parts
    ]


def test_nothing_above_transport_branches_on_the_address_class() -> None:
    offenders = []
    for path in _outside_transport_layer():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and len(node.args) == 2
                and _ADDRESS_CLASSES
                & {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            ) or (
                isinstance(node, ast.MatchClass)
                and getattr(node.cls, "id", None) in _ADDRESS_CLASSES
            ):
                offenders.append(f"{path.relative_to(_SRC)}:{node.lineno}")
    assert offenders == []


def test_vsock_constants_are_defined_once() -> None:
    names = {"VMADDR_CID_ANY", "VMADDR_CID_HOST", "VMADDR_PORT_ANY", "_VMADDR_CID_ANY"}
    offenders = []
    for path in sorted(_SRC.rglob("*.py")):
        if path.name == "vsock_constants.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.lstrip("_") in names:
                        offenders.append(f"{path.relative_to(_SRC)}:{node.lineno}")
    assert offenders == []
