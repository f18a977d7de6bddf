"""AF_VSOCK transport (vsock(7)).

``listen`` binds ``(cid, port)``; the default CID in the CLI is VMADDR_CID_ANY so a guest
accepts connections however it is addressed. Port 0 means "pick a free port" (mapped to
VMADDR_PORT_ANY, like TCP port 0). ``connect`` refuses CID ANY, which names no peer.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from vsockrpc.addresses import Address, VsockAddress
from vsockrpc.errors import AddressError, TransportError
from vsockrpc.transport._errors import mapping_connect_errors, mapping_listen_errors
from vsockrpc.vsock_constants import VMADDR_CID_ANY, VMADDR_PORT_ANY

__all__ = [
    "TRANSPORT",
    "VMADDR_PORT_ANY",
    "VsockTransport",
    "connect",
    "listen",
    "sockaddr_for_connect",
    "sockaddr_for_listen",
]


def _new_socket() -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    try:
        if family is None:
            raise OSError("this Python has no socket.AF_VSOCK")
        return socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise TransportError(
            f"AF_VSOCK sockets are unavailable: {err}",
            hint="load the vsock kernel module (vmw_vsock_virtio_transport in a guest)",
        ) from err


def sockaddr_for_listen(address: VsockAddress) -> tuple[int, int]:
    """The ``bind()`` tuple: port 0 becomes VMADDR_PORT_ANY (the kernel picks one)."""
    return (address.cid, VMADDR_PORT_ANY if address.port == 0 else address.port)


def sockaddr_for_connect(address: VsockAddress) -> tuple[int, int]:
    """The ``connect()`` tuple; CID ANY names no peer, so it is an :class:`AddressError`."""
    if address.is_any:
        raise AddressError(f"cannot connect to {address}: CID -1 (any) is only for listening")
    return address.sockaddr()


def connect(address: VsockAddress, *, timeout: float | None = None) -> socket.socket:
    """Connect to ``address``; ``timeout`` bounds the connect, the socket returned blocks."""
    sockaddr = sockaddr_for_connect(address)
    sock = _new_socket()
    try:
        with mapping_connect_errors(str(address)):
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def listen(address: VsockAddress, *, backlog: int = 128) -> socket.socket:
    """A bound, listening AF_VSOCK socket (``getsockname()`` gives the real port)."""
    sock = _new_socket()
    try:
        with mapping_listen_errors(str(address)):
            sock.bind(sockaddr_for_listen(address))
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class VsockTransport:
    """``vsock:CID:PORT``: grpcio dials it natively only when built with vsock (not PyPI's)."""

    scheme = "vsock"

    def connect(self, address: VsockAddress, *, timeout: float | None = None) -> socket.socket:
        return connect(address, timeout=timeout)

    def listen(self, address: VsockAddress, *, backlog: int = 128) -> socket.socket:
        return listen(address, backlog=backlog)

    def listening_address(self, address: VsockAddress, listener: socket.socket) -> VsockAddress:
        return VsockAddress(address.cid, int(listener.getsockname()[1]))

    def grpc_target(self, address: VsockAddress) -> str | None:
        cid, port = sockaddr_for_connect(address)
        return f"vsock:{cid}:{port}"

    def prepare_grpc_listen(self, address: VsockAddress) -> str | None:
        cid, port = sockaddr_for_listen(address)
        return f"vsock:{cid}:{port}"

    def bound_address(self, address: VsockAddress, port: int) -> VsockAddress:
        return VsockAddress(address.cid, port) if 0 < port < VMADDR_PORT_ANY else address

    def accepted_peer(self, conn: socket.socket, peer: object) -> Address | None:
        # accept() on AF_VSOCK gives (cid, port); the CID is set by the hypervisor/kernel.
        if conn.family == getattr(socket, "AF_VSOCK", None) and isinstance(peer, tuple):
            return VsockAddress(int(peer[0]), int(peer[1]))
        return None

    def sibling(self, address: VsockAddress, *, port: int = 0, path: str = "") -> Address | None:
        return VsockAddress(address.cid, port) if port else None

    def callback_address(
        self, peer: VsockAddress, socket_path: Callable[[], str]
    ) -> Address | None:
        return VsockAddress(VMADDR_CID_ANY, 0)  # any CID, a port the kernel picks


TRANSPORT = VsockTransport()
