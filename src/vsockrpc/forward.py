"""Forward connections between host sockets and guest ports (host side only).

- :func:`forward` — host → guest: accept on a host address (``tcp:127.0.0.1:8080``,
  ``unix:/run/web.sock``) and open one stream per connection to a guest port, on the same
  device as the guest's agent address (``hvsock:/run/vm.vsock:9999`` → ``hvsock:…:80``).
- :func:`expose` — guest → host: a guest connecting to CID 2 port ``P`` reaches a host socket.
  The hybrid device connects to ``<uds>_<P>`` for that (Firecracker's convention, which our
  device follows), so we listen there and connect each guest connection to the exposed host
  address. Only what is exposed is reachable.

Both return a :class:`Forwarder`, a context manager. Each connection is dialled afresh when it
is accepted, so a guest that reboots only fails the connections made while it is down (each is
closed with a log line naming the cause; the listener keeps serving), and one broken connection
never affects the others. On our own device a host → guest connection is passed to the device
with its ``CONNECT`` (:func:`vsockrpc.transport.dial_for`), so its bytes flow between the client
and the guest with no hop through this process; elsewhere (a Firecracker or Cloud Hypervisor
socket, a guest → host expose) they move through :class:`vsockrpc.rpc._relay.Relay` — the same
splice(2) pump with half-close the gRPC relay uses — rather than a second implementation.

This module is host-only (it is not part of the guest payload): the guest side of a forward is
the guest's own listener or its AF_VSOCK connect to CID 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import weakref
from types import TracebackType
from typing import Any

from vsockrpc import transport
from vsockrpc._checks import seconds
from vsockrpc.addresses import Address, HybridAddress, parse_address
from vsockrpc.errors import AddressError, VsockRpcError
from vsockrpc.rpc._relay import Passed, Relay
from vsockrpc.transport import DEFAULT_DIALER, Dialer, dial_for, unix
from vsockrpc.vsock_constants import MAX_PORT

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MODE",
    "MAX_PORT",
    "Forwarder",
    "expose",
    "forward",
]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds a connection may take to reach its destination (connect plus hybrid handshake)."""
DEFAULT_MODE = unix.DEFAULT_MODE
"""Mode of a Unix socket file a forwarder listens on: only its owner may connect."""


def _check_port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= MAX_PORT:
        raise AddressError(f"bad {what} {port!r}: expected a port from 1 to {MAX_PORT}")
    return port


class _Socket:
    """The Unix socket file a listener created (path and inode), removed only if still ours."""

    def __init__(self, listener: socket.socket) -> None:
        self.path: str | None = None
        self._inode = 0
        if listener.family == socket.AF_UNIX:
            name = listener.getsockname()
            if isinstance(name, str) and name and not name.startswith("\0"):
                self.path = name
                self._inode = os.stat(name).st_ino

    def chmod(self, mode: int) -> None:
        # The transport created the file owner-only (unix.DEFAULT_MODE) before listen(), so
        # a wider mode asked for is only ever granted here, never a window of the umask's.
        if self.path is not None and mode != unix.DEFAULT_MODE:
            os.chmod(self.path, mode)

    def remove(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def _stop(relay: Relay, created: _Socket) -> None:
    relay.close()
    created.remove()


def _release(relay: Relay, created: _Socket) -> None:
    """Close ``relay`` and remove its socket file; from a relay thread (a collection there
    must not join itself), in a thread of its own."""
    if threading.current_thread().name.startswith("vsockrpc-"):
        threading.Thread(
            target=_stop, args=(relay, created), name="vsockrpc-forward-close", daemon=True
        ).start()
    else:
        _stop(relay, created)


class Forwarder:
    """Accepts on :attr:`listen_address` and relays each connection to :attr:`target`.

    Started when constructed; :meth:`close` (or leaving the ``with`` block) stops accepting,
    breaks live connections, joins every thread and removes a Unix socket file it created.
    An unclosed forwarder is closed the same way when it is garbage-collected or at exit.
    :attr:`description` says what it forwards, for humans (``tcp:127.0.0.1:8080 -> guest
    port 80``). ``last_error`` is why the last connection could not reach the target (None after a
    success); ``failures`` counts such connections.
    """

    def __init__(
        self,
        listen: Address | str,
        target: Address | str,
        *,
        mode: int = DEFAULT_MODE,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        dialer: Dialer = DEFAULT_DIALER,
        listen_label: str | None = None,
        target_label: str | None = None,
    ) -> None:
        self.target: Address = parse_address(target)
        requested = parse_address(listen)
        unix.check_mode(mode)
        if connect_timeout is not None:
            seconds(connect_timeout, "connect_timeout")
        listener = transport.listen(requested)
        try:
            created = _Socket(listener)
            created.chmod(mode)
            self.listen_address: Address = transport.listening_address(requested, listener)
        except BaseException:
            listener.close()
            raise
        self.description = f"{listen_label or self.listen_address} -> {target_label or self.target}"
        # The relay's threads must not hold the forwarder (it would never be collected), so
        # what they update lives in a plain dict they share with it.
        state: dict[str, Any] = {"last_error": None, "failures": 0}
        self._state = state
        dial_target, what = self.target, self.description

        def dial(conn: socket.socket, peer: object) -> socket.socket | Passed:
            try:
                sock, passed = dial_for(dialer, dial_target, conn, timeout=connect_timeout)
            except (VsockRpcError, OSError) as err:
                state["last_error"] = str(err)
                state["failures"] += 1
                log.warning("forward %s: connection from %s closed: %s", what, _peer(peer), err)
                raise
            state["last_error"] = None
            how = "passed to the device" if passed else "relayed"
            log.debug("forward %s: connection from %s, %s", what, _peer(peer), how)
            return Passed(sock) if passed else sock

        self._relay = Relay(listener, dial, name="forward")
        self._relay.start()
        self._finalizer = weakref.finalize(self, _release, self._relay, created)

    @property
    def active_connections(self) -> int:
        return self._relay.active_connections

    @property
    def passed_connections(self) -> int:
        """Connections the device took over since the start (our hybrid device: no relay in
        between, see :func:`vsockrpc.transport.dial_for`); the others are relayed."""
        return self._relay.passed_connections

    @property
    def last_error(self) -> str | None:
        error: str | None = self._state["last_error"]
        return error

    @property
    def failures(self) -> int:
        count: int = self._state["failures"]
        return count

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop accepting, break live connections, join all threads; idempotent."""
        self._finalizer()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Forwarder {self.description} ({state})>"


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return "a local client" if not peer else str(peer)


def forward(
    guest: Address | str,
    *,
    listen: Address | str,
    to: int,
    mode: int = DEFAULT_MODE,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    dialer: Dialer = DEFAULT_DIALER,
) -> Forwarder:
    """Host → guest: accept on ``listen`` and connect each connection to port ``to`` of the
    guest whose agent is at ``guest`` (``hvsock:PATH:PORT`` or ``vsock:CID:PORT``)::

        with forward("hvsock:/run/vm.vsock:9999", listen="tcp:127.0.0.1:8080", to=80):
            urllib.request.urlopen("http://127.0.0.1:8080/")

    A Unix socket file it creates gets ``mode``. Raises :class:`~vsockrpc.errors.AddressError`
    for a bad address or port, :class:`~vsockrpc.errors.TransportError` when it can't listen.
    """
    parsed = parse_address(guest)
    target = transport.sibling(parsed, port=_check_port(to, "guest port"))
    if target is None:
        raise AddressError(f"{parsed} names no guest port: expected hvsock:PATH:PORT or vsock")
    return Forwarder(
        listen,
        target,
        mode=mode,
        connect_timeout=connect_timeout,
        dialer=dialer,
        target_label=f"guest port {to}",
    )


def expose(
    guest: Address | str,
    target: Address | str,
    *,
    port: int,
    mode: int = DEFAULT_MODE,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    dialer: Dialer = DEFAULT_DIALER,
) -> Forwarder:
    """Guest → host: a guest connecting to CID 2 port ``port`` reaches the host's ``target``
    (``unix:/run/app.sock``, ``tcp:127.0.0.1:6000``); ``guest`` is the guest's agent address
    on a hybrid device (``hvsock:PATH:PORT``): the device connects to ``PATH_port``, where
    this listens (its socket file gets ``mode``)::

        with expose("hvsock:/run/vm.vsock:9999", "unix:/run/app.sock", port=5000):
            ...  # in the guest: connect AF_VSOCK (2, 5000)

    Raises :class:`~vsockrpc.errors.AddressError` for a bad address or port, or a Unix
    ``target`` whose socket file does not exist; :class:`~vsockrpc.errors.TransportError`
    when it can't listen.
    """
    parsed = parse_address(guest)
    destination = parse_address(target)
    # Only a Unix target has a socket path to check (addresses without one have no "path").
    path = getattr(destination, "path", None)
    if isinstance(path, str) and not os.path.exists(path):
        raise AddressError(f"cannot expose {destination}: no such socket file")
    _check_port(port, "port")
    # A feature of hybrid devices, not a behaviour that differs by kind: only they hand a
    # guest's connection to host port P to a socket we own (<uds>_P). With the kernel's
    # vhost-vsock device the guest reaches the host's AF_VSOCK listeners of every guest,
    # and a listen "on" a guest CID binds but is never reached: refuse rather than that.
    at = transport.sibling(parsed, port=port) if parsed.scheme == HybridAddress.scheme else None
    if at is None:
        raise AddressError(
            f"cannot expose on {parsed}: expected the guest's hybrid address (hvsock:PATH:PORT, "
            "a userspace or Firecracker device)"
        )
    return Forwarder(
        at,
        destination,
        mode=mode,
        connect_timeout=connect_timeout,
        dialer=dialer,
        listen_label=f"guest CID 2 port {port}",
    )
