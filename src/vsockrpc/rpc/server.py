"""``serve()``: one grpcio server on any number of addresses, relaying those grpcio can't bind."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from contextlib import ExitStack
from functools import partial
from types import TracebackType
from typing import Any

import grpc

from vsockrpc import transport
from vsockrpc.addresses import Address
from vsockrpc.addresses import parse_address as _parse
from vsockrpc.errors import AddressError, BadInputError, TransportError
from vsockrpc.rpc import _peers
from vsockrpc.rpc._creds import read_peer_credentials
from vsockrpc.rpc._limits import ConnectionLimits
from vsockrpc.rpc._native import DEFAULT_OPTIONS, native_listen_target
from vsockrpc.rpc._private import PrivateDir
from vsockrpc.rpc._quiet import capturing_stderr
from vsockrpc.rpc._relay import Relay
from vsockrpc.rpc._unix_serve import OwnedSocketFile, bind_unix_with_mode
from vsockrpc.transport import unix as unix_transport

__all__ = ["DEFAULT_LIMITS", "Server", "serve"]

Registrar = Callable[[grpc.Server], None]

DEFAULT_LIMITS = ConnectionLimits()
"""What a server-side relay admits unless told otherwise (see :mod:`vsockrpc.rpc._limits`)."""


def _backlog(limits: ConnectionLimits | None) -> int:
    """The relayed listener's accept backlog: room for every connection the limits admit.

    A burst of connections must wait in the kernel's queue, not be refused there: when the
    queue is full a vsock listener answers the REQUEST with RST (net/vmw_vsock/af_vsock.c,
    ``sk_acceptq_is_full``), and under load the relay's accept loop can fall behind a burst.
    The kernel clamps it to ``net.core.somaxconn`` (4096 by default). No limits: the defaults'.
    """
    admitted = limits or DEFAULT_LIMITS
    return admitted.max_connections + admitted.reserve


class Server:
    """A started gRPC server; a context manager that stops it (and its relays) on exit."""

    def __init__(
        self,
        server: grpc.Server,
        addresses: Sequence[Address],
        relays: Sequence[Relay],
        private_dir: PrivateDir | None,
        socket_files: Sequence[str] = (),
        *,
        owned_files: Sequence[OwnedSocketFile] = (),
    ) -> None:
        self._socket_files = tuple(socket_files)
        self._owned_files = tuple(owned_files)
        self._server = server
        self.addresses: tuple[Address, ...] = tuple(addresses)
        self._relays = tuple(relays)
        self._private_dir = private_dir
        self._stopped = False
        self._stop_lock = threading.Lock()

    @property
    def relayed_connections(self) -> int:
        """Connections the server-side relays are carrying right now."""
        return sum(relay.active_connections for relay in self._relays)

    @property
    def grpc_server(self) -> grpc.Server:
        return self._server

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let calls finish for ``grace`` seconds, then close everything."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        for relay in self._relays:
            relay.stop_accepting()
        self._server.stop(grace).wait()
        for relay in self._relays:
            relay.close()
        for path in self._socket_files:
            _unlink_socket(path)
        for owned in self._owned_files:
            owned.remove()
        if self._private_dir is not None:
            _peers.untrust_directory(self._private_dir.path)
            self._private_dir.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops; like grpcio, returns True if ``timeout`` passed first."""
        result: bool = self._server.wait_for_termination(timeout)
        return result

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(None)


def _unlink_socket(path: str) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _add_port(server: grpc.Server, target: str, what: str) -> int:
    with capturing_stderr() as captured:
        try:
            port: int = server.add_insecure_port(target)
        except RuntimeError as err:
            failure: RuntimeError | None = err
        else:
            failure = None
    if failure is None:
        captured.replay()
        return port
    reason = captured.reason() or str(failure)
    raise TransportError(f"cannot listen on {what}: {reason}") from failure


def _relay_dial(
    private_dir: PrivateDir, inner_path: str, listening: Address, *, credentials: bool = False
) -> Callable[[socket.socket, object], socket.socket]:
    """Connect to grpcio's private socket from a name conveying the peer (and, with
    ``credentials``, a Unix peer's SO_PEERCRED)."""

    def dial(conn: socket.socket, peer: object) -> socket.socket:
        original = transport.accepted_peer(listening, conn, peer)
        creds = read_peer_credentials(conn) if credentials else None
        name = _peers.client_name(private_dir.path, original, creds)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(name)
            try:
                sock.connect(inner_path)
            finally:
                os.unlink(name)  # the kernel keeps the bound name for getpeername()
        except BaseException:
            sock.close()
            raise
        return sock

    return dial


def serve(
    services: Iterable[Registrar],
    listen: Sequence[Address | str],
    *,
    max_workers: int = 16,
    maximum_concurrent_rpcs: int | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
    unix_mode: int = unix_transport.DEFAULT_MODE,
    peer_credentials: bool = False,
    limits: ConnectionLimits | None = DEFAULT_LIMITS,
) -> Server:
    """Start a gRPC server with ``services`` on every address in ``listen``.

    Unix and TCP addresses (and vsock when grpcio supports it) are bound by grpcio itself;
    vsock and hybrid addresses otherwise go through a relay into a private Unix socket.
    Every Unix socket file gets mode ``unix_mode`` (default ``0600``), whatever the umask.
    ``peer_credentials=True`` relays Unix addresses too, so that servicers learn each caller's
    ``SO_PEERCRED`` (:func:`vsockrpc.rpc.peer_credentials`; the agent checks the uid).
    ``limits`` caps the connections each relay holds and closes silent ones (None: no caps).
    ``maximum_concurrent_rpcs``: calls past it are refused (RESOURCE_EXHAUSTED), not queued.
    Raises :class:`AddressError` for bad addresses and :class:`TransportError` when a bind fails.
    """
    unix_transport.check_mode(unix_mode)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise BadInputError(f"max_workers must be a whole number, 1 or more: not {max_workers!r}")
    addresses = [_parse(item) for item in listen]
    if not addresses:
        raise AddressError("serve() needs at least one listen address")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vsockrpc-rpc"),
        interceptors=list(interceptors),
        options=[*DEFAULT_OPTIONS, *options],
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    for register in services:
        register(server)
    with ExitStack() as cleanup:
        cleanup.callback(server.stop, None)
        bound: list[Address] = []
        relays: list[Relay] = []
        socket_files: list[str] = []
        owned_files: list[OwnedSocketFile] = []
        private_dir: PrivateDir | None = None
        inner_path = ""
        for address in addresses:
            target = native_listen_target(address)  # a stale Unix socket file is removed
            # grpcio's own Unix listener, unless the peers' credentials are wanted (relay).
            unix_path = _unix_path(target)
            if unix_path is not None and not peer_credentials:
                owned = bind_unix_with_mode(
                    partial(_add_port, server), unix_path, unix_mode, str(address)
                )
                if owned is not None:
                    owned_files.append(owned)
                    cleanup.callback(owned.remove)
                    bound.append(address)
                    continue
                # else: too long a path for the private bind; the relay serves it instead
            if target is not None and unix_path is None:
                port = _add_port(server, target, str(address))
                bound.append(transport.bound_address(address, port))
                continue
            if private_dir is None:
                private_dir = cleanup.enter_context(PrivateDir())
                _peers.trust_directory(private_dir.path)
                cleanup.callback(_peers.untrust_directory, private_dir.path)
                inner_path = private_dir.join("grpc")
                _add_port(server, f"unix:{inner_path}", str(address))
            if unix_path is not None:
                listener = unix_transport.listen_path(
                    unix_path, mode=unix_mode, what=str(address), backlog=_backlog(limits)
                )
            else:
                listener = transport.listen(address, backlog=_backlog(limits))
            if listener.family == socket.AF_UNIX:  # hybrid: <path>_<port>; grpcio-like cleanup
                socket_files.append(listener.getsockname())
                cleanup.callback(_unlink_socket, socket_files[-1])
            dial = _relay_dial(private_dir, inner_path, address, credentials=unix_path is not None)
            relay = Relay(listener, dial, name=f"serve {address}", limits=limits)
            cleanup.callback(relay.close)
            relays.append(relay)
            bound.append(transport.listening_address(address, listener))
        server.start()
        for relay in relays:
            relay.start()
        cleanup.pop_all()
    return Server(server, bound, relays, private_dir, socket_files, owned_files=owned_files)


def _unix_path(target: str | None) -> str | None:
    """The path of grpcio's ``unix:`` target (``unix://`` + a path starting ``//``), else None."""
    if target is None or not target.startswith("unix:"):
        return None
    rest = target.removeprefix("unix:")
    return rest.removeprefix("//") if rest.startswith("////") else rest
