"""Transport calls on real sockets: AF_VSOCK and TCP listeners, a Unix socket file, the default
dialer's Unix connect (moved here from the unit tier, which opens no socket).

SAFETY: nothing here calls connect() on an AF_VSOCK socket; the AF_VSOCK test only listens.
"""

from __future__ import annotations

import pathlib
import socket

import pytest

from tests import host
from vsockrpc import transport
from vsockrpc.addresses import (
    VMADDR_CID_ANY,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from vsockrpc.errors import TransportError
from vsockrpc.transport import vsock
from vsockrpc.vsock_constants import VMADDR_PORT_ANY


@pytest.mark.timeout(30)
@pytest.mark.skipif(not host.AF_VSOCK, reason=host.AF_VSOCK_MISSING)
def test_vsock_listen_on_cid_any_picks_a_port() -> None:
    with transport.listen("vsock:-1:0") as sock:
        assert sock.family == socket.AF_VSOCK
        cid, port = sock.getsockname()
        assert cid == VMADDR_CID_ANY
        assert port not in (0, vsock.VMADDR_PORT_ANY)
        # It really listens: a second bind on the same port is refused.
        with pytest.raises(TransportError, match="cannot listen on vsock:-1"):
            transport.listen(VsockAddress(VMADDR_CID_ANY, port)).close()


@pytest.mark.timeout(30)
def test_grpc_listen_target_and_bound_address(tmp_path: pathlib.Path) -> None:
    assert transport.prepare_grpc_listen(parse_address("vsock:-1:0")) == (
        f"vsock:{VMADDR_CID_ANY}:{VMADDR_PORT_ANY}"
    )
    assert transport.prepare_grpc_listen(parse_address("hvsock:/x:1")) is None
    # A stale socket file is cleared for grpcio (a live one would be refused).
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    assert transport.prepare_grpc_listen(UnixAddress(str(stale))) == f"unix:{stale}"
    assert not stale.exists()
    assert transport.bound_address(TcpAddress("::", 0), 4242) == TcpAddress("::", 4242)
    assert transport.bound_address(VsockAddress(VMADDR_CID_ANY, 0), 1025) == VsockAddress(
        VMADDR_CID_ANY, 1025
    )
    assert transport.bound_address(VsockAddress(3, 0), VMADDR_PORT_ANY) == VsockAddress(3, 0)
    assert transport.bound_address(UnixAddress("/x"), 0) == UnixAddress("/x")


@pytest.mark.timeout(30)
def test_listening_address_fills_in_the_port() -> None:
    with transport.listen("tcp:127.0.0.1:0") as listener:
        bound = transport.listening_address(TcpAddress("127.0.0.1", 0), listener)
        assert bound == TcpAddress("127.0.0.1", listener.getsockname()[1])
        assert isinstance(bound, TcpAddress) and bound.port > 0


@pytest.mark.timeout(30)
def test_default_dialer_opens_real_sockets(tmp_path: pathlib.Path) -> None:
    with transport.listen(f"unix:{tmp_path}/s.sock") as listener:
        sock = transport.DEFAULT_DIALER.connect(UnixAddress(f"{tmp_path}/s.sock"), timeout=5)
        with sock, listener.accept()[0]:
            assert sock.family == socket.AF_UNIX
