"""What every address kind provides (one implementation per module of :mod:`vsockrpc.transport`).

The model is httpcore's ``NetworkBackend``: the code above (``serve()``, ``channel()``, the
relay, the agent's data channel, the SDK) calls these methods and never branches on the kind
of an address; adding a kind means adding one module here.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol, TypeVar

from vsockrpc.addresses import Address

__all__ = ["Dialer", "Transport"]

A = TypeVar("A", bound=Address)


class Transport(Protocol[A]):
    """The behaviour of one address kind (its ``scheme``)."""

    scheme: str

    def connect(self, address: A, *, timeout: float | None = None) -> socket.socket:
        """A connected, blocking socket; ``timeout`` bounds connect and any handshake."""
        ...

    def listen(self, address: A, *, backlog: int = 128) -> socket.socket:
        """A bound, listening socket."""
        ...

    def listening_address(self, address: A, listener: socket.socket) -> A:
        """``address`` as ``listener`` (from :meth:`listen`) is reached: a port 0 filled in."""
        ...

    def grpc_target(self, address: A) -> str | None:
        """The target grpcio dials for ``address`` (if the build supports that URI scheme), or
        None when no grpcio can (then a relay dials with :meth:`connect`). Raises
        :class:`~vsockrpc.errors.AddressError` for an address that names no peer."""
        ...

    def prepare_grpc_listen(self, address: A) -> str | None:
        """The target for grpcio's ``add_insecure_port`` after clearing the way (a stale Unix
        socket file is removed), or None when grpcio can't bind it (listen + relay instead)."""
        ...

    def bound_address(self, address: A, port: int) -> A:
        """``address`` after grpcio bound it and returned ``port`` (a port 0 filled in)."""
        ...

    def accepted_peer(self, conn: socket.socket, peer: object) -> Address | None:
        """The address of the peer of ``conn``, accepted (with ``peer``) on a listener of this
        kind; None when the listener can't know it (a hybrid socket hides the guest's CID)."""
        ...

    def sibling(self, address: A, *, port: int = 0, path: str = "") -> Address | None:
        """The same peer as ``address`` on another ``port`` (vsock, hybrid, TCP) or at another
        socket ``path`` (Unix); None when what is given does not apply to this kind."""
        ...

    def callback_address(self, peer: A, socket_path: Callable[[], str]) -> Address | None:
        """Where to listen so that ``peer`` (a caller of ours) can open another connection to
        us, with a kernel-picked port; ``socket_path()`` gives a private path when one is
        needed. None when this kind can't be called back."""
        ...


class Dialer(Protocol):
    """Opens connections: what ``channel()`` and the relay call (injectable, e.g. in tests)."""

    def connect(self, address: Address, *, timeout: float | None = None) -> socket.socket: ...
