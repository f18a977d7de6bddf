"""AF_VSOCK transport (vsock(7)).

``listen`` binds ``(cid, port)``; the default CID in the CLI is VMADDR_CID_ANY so a guest
accepts connections however it is addressed. Port 0 means "pick a free port" (mapped to
VMADDR_PORT_ANY, like TCP port 0). ``connect`` refuses CID ANY, which names no peer.
"""

from __future__ import annotations

import socket

from vsockrpc.addresses import VsockAddress
from vsockrpc.errors import AddressError, TransportError
from vsockrpc.transport._errors import mapping_connect_errors, mapping_listen_errors

__all__ = ["VMADDR_PORT_ANY", "connect", "listen", "sockaddr_for_connect", "sockaddr_for_listen"]

VMADDR_PORT_ANY = 0xFFFFFFFF  # include/uapi/linux/vm_sockets.h


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
