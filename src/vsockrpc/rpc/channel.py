"""``channel()``: a grpcio channel to any address, relayed when grpcio can't dial it itself."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc

from vsockrpc import transport
from vsockrpc.addresses import Address, VsockAddress, parse_address
from vsockrpc.errors import TransportError, TransportTimeout, VsockRpcError
from vsockrpc.rpc._private import PrivateDir
from vsockrpc.rpc._relay import Relay
from vsockrpc.rpc.server import DEFAULT_OPTIONS, native_target
from vsockrpc.transport import unix as unix_transport
from vsockrpc.transport import vsock as vsock_transport

__all__ = ["RETRY_OPTIONS", "RelayChannel", "channel", "channel_ready", "wait_until_ready"]

# Reconnect quickly while a guest boots (grpcio's defaults start at 1 s and grow to 120 s).
RETRY_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# How long the relay waits for the real connection (and a hybrid OK) before giving up on it.
DEFAULT_CONNECT_TIMEOUT = 10.0


class RelayChannel(grpc.Channel):  # type: ignore[misc]  # grpc ships no type information
    """A grpcio channel on a private Unix socket whose connections a relay forwards to
    ``address``. Closing the channel stops the relay and joins its threads."""

    def __init__(
        self, inner: grpc.Channel, relay: Relay, private_dir: PrivateDir, address: Address
    ):
        self._inner = inner
        self._relay = relay
        self._private_dir = private_dir
        self.address = address

    @property
    def relay(self) -> Relay:
        return self._relay

    def subscribe(self, callback: Callable[..., None], try_to_connect: bool = False) -> None:
        self._inner.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[..., None]) -> None:
        self._inner.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        self._inner.close()
        self._relay.close()
        self._private_dir.close()

    def __enter__(self) -> RelayChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def channel(
    address: Address | str,
    *,
    options: Sequence[tuple[str, Any]] = (),
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    relay: bool | None = None,
) -> grpc.Channel:
    """An insecure grpcio channel to ``address``; use it as a context manager.

    Unix and TCP (and vsock with a vsock-enabled grpcio) are dialled by grpcio; vsock and
    hybrid vsock otherwise go through a relay: grpcio dials a private Unix socket and each
    connection there is forwarded to a fresh :func:`vsockrpc.transport.connect` (bounded by
    ``connect_timeout``). A connection the relay can't open is closed, which grpcio reports as
    ``UNAVAILABLE`` and retries with backoff. ``relay=True`` relays any address (tests and
    benchmarks measure the relay with Unix sockets as its outer side), ``False`` never does.
    """
    parsed = parse_address(address)
    if isinstance(parsed, VsockAddress):
        vsock_transport.sockaddr_for_connect(parsed)  # CID -1 names no peer: AddressError now
    all_options = [*DEFAULT_OPTIONS, *options]
    target = native_target(parsed)
    if relay is False and target is None:
        raise TransportError(f"grpcio cannot dial {parsed} without the relay")
    if target is not None and not relay:
        return grpc.insecure_channel(target, options=all_options)
    forwarder, private_dir, path = open_relay(parsed, connect_timeout)
    inner = grpc.insecure_channel(f"unix:{path}", options=all_options)
    return RelayChannel(inner, forwarder, private_dir, parsed)


def open_relay(address: Address, connect_timeout: float | None) -> tuple[Relay, PrivateDir, str]:
    """Start a client-side relay to ``address``; returns it, its directory and socket path."""

    def dial(_conn: socket.socket, _peer: object) -> socket.socket:
        return transport.connect(address, timeout=connect_timeout)

    private_dir = PrivateDir()
    try:
        path = private_dir.join("relay")
        forwarder = Relay(unix_transport.listen_path(path), dial, name=f"channel {address}")
    except BaseException:
        private_dir.close()
        raise
    return forwarder.start(), private_dir, path


def channel_ready(
    ch: grpc.Channel,
    *,
    timeout: float,
    what: str = "the server",
    address: Address | None = None,
) -> None:
    """Block until ``ch`` is connected (grpcio retries with its reconnect backoff meanwhile).

    Raises :class:`TransportTimeout` naming the last connection error: the relay's, or for a
    direct channel one probe connect to ``address`` when it is given.
    """
    try:
        grpc.channel_ready_future(ch).result(timeout=timeout)
    except grpc.FutureTimeoutError as err:
        last = ch.relay.last_error if isinstance(ch, RelayChannel) else None
        if last is None and address is not None:
            last = _diagnose(address)
        detail = f": {last}" if last else ""
        raise TransportTimeout(f"{what} not ready after {timeout:.1f} s{detail}") from err


def _diagnose(address: Address) -> str:
    """Why ``address`` gives no gRPC connection, from one plain transport connect."""
    try:
        sock = transport.connect(address, timeout=1.0)
    except VsockRpcError as err:
        return str(err)
    sock.close()
    return "it accepts connections, but no gRPC server answered"


def wait_until_ready(address: Address | str, *, timeout: float) -> None:
    """Retry with backoff until a gRPC connection to ``address`` is established.

    Raises :class:`TransportTimeout` (with the last connection error) after ``timeout``
    seconds, and :class:`AddressError` for an address no retry can fix.
    """
    parsed = parse_address(address)
    start = time.monotonic()
    with channel(parsed, options=RETRY_OPTIONS) as ch:
        remaining = max(timeout - (time.monotonic() - start), 0.0)
        channel_ready(ch, timeout=remaining, what=str(parsed), address=parsed)
