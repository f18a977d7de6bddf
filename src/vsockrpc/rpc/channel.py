"""``channel()``: a grpcio channel to any address, relayed when grpcio can't dial it itself.

The sync channel here and :func:`vsockrpc.rpc.aio.channel` share :func:`route` (how an address
is reached: a grpcio target, or a :class:`~vsockrpc.rpc._client.ClientRelay`) and
:class:`Relayed` (the relay's lifecycle: closed by ``close()``, or by a finalizer when the channel
is garbage-collected unclosed, or at interpreter exit).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc

from vsockrpc import transport
from vsockrpc.addresses import Address, parse_address
from vsockrpc.errors import TransportError, TransportTimeout, VsockRpcError
from vsockrpc.rpc._client import ClientRelay, wrap_multicallable
from vsockrpc.rpc._native import DEFAULT_OPTIONS, native_target
from vsockrpc.rpc._relay import Relay
from vsockrpc.transport import DEFAULT_DIALER, Dialer

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "RETRY_OPTIONS",
    "RelayChannel",
    "channel",
    "channel_ready",
    "route",
    "wait_until_ready",
]

# Reconnect quickly while a guest boots (grpcio's defaults start at 1 s and grow to 120 s).
# Not "grpc.min_reconnect_backoff_ms": gRPC core takes it as the *minimum connect timeout*
# (subchannel backoff options; default 20 s, floor 100 ms), so a low value abandoned every
# connection attempt whose HTTP/2 handshake outlasted the current backoff step (a just-restored
# TCG guest's first handshake takes ~0.3 s) and started another one from scratch.
RETRY_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# How long the relay waits for the real connection (and a hybrid OK) before giving up on it.
DEFAULT_CONNECT_TIMEOUT = 10.0


def route(
    address: Address | str,
    *,
    connect_timeout: float | None,
    relay: bool | None,
    dialer: Dialer | None,
) -> tuple[Address, str, ClientRelay | None]:
    """How to reach ``address``: (parsed address, grpcio target, relay or None).

    The address is parsed once, here. grpcio dials Unix and TCP itself (and vsock when built
    with it) unless ``relay`` is True or a ``dialer`` is given; everything else goes through a
    relay that opens each connection with ``dialer`` (default: real sockets).
    """
    parsed = parse_address(address)
    target = native_target(parsed)  # AddressError now for an address naming no peer (CID -1)
    if relay is False and target is None:
        raise TransportError(f"grpcio cannot dial {parsed} without the relay")
    if target is not None and not relay and dialer is None:
        return parsed, target, None
    forwarder = ClientRelay(parsed, dialer or DEFAULT_DIALER, connect_timeout)
    return parsed, forwarder.target, forwarder


def _close_sync(inner: Any, forwarder: ClientRelay) -> None:
    inner.close()
    forwarder.close()


class Relayed:
    """What a relayed channel (sync or aio) adds to grpcio's: the relay and its lifecycle."""

    address: Address
    _forwarder: ClientRelay
    _finalizer: weakref.finalize[Any, Any]

    def _attach(self, forwarder: ClientRelay, release: Callable[[], None]) -> None:
        self.address = forwarder.address
        self._forwarder = forwarder
        # Runs once: on close(), when the channel is collected unclosed, or at exit.
        self._finalizer = weakref.finalize(self, release)

    @property
    def relay(self) -> Relay:
        return self._forwarder.relay

    @property
    def last_error(self) -> str | None:
        """Why the relay's last connection attempt failed (None after a success)."""
        return self._forwarder.last_error

    _aio = False

    def _wrap(self, inner: Any, kind: str) -> Any:
        return wrap_multicallable(inner, self._forwarder.fix, self, kind=kind, aio=self._aio)


class RelayChannel(Relayed, grpc.Channel):  # type: ignore[misc]  # grpc ships no type information
    """A grpcio channel on a private Unix socket whose connections a relay forwards to
    ``address``. Closing the channel (or dropping it) stops the relay and joins its threads."""

    def __init__(self, inner: grpc.Channel, forwarder: ClientRelay) -> None:
        self._inner = inner
        self._attach(forwarder, lambda: _close_sync(inner, forwarder))

    def subscribe(self, callback: Callable[..., None], try_to_connect: bool = False) -> None:
        self._inner.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[..., None]) -> None:
        self._inner.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._inner.unary_unary(method, *args, **kwargs), "unary_unary")

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._inner.unary_stream(method, *args, **kwargs), "unary_stream")

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._inner.stream_unary(method, *args, **kwargs), "stream_unary")

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._inner.stream_stream(method, *args, **kwargs), "stream_stream")

    def close(self) -> None:
        self._finalizer()

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
    dialer: Dialer | None = None,
) -> grpc.Channel:
    """An insecure grpcio channel to ``address``; use it as a context manager.

    Unix and TCP (and vsock with a vsock-enabled grpcio) are dialled by grpcio; vsock and
    hybrid vsock otherwise go through a relay: grpcio dials a private Unix socket and each
    connection there is forwarded to a fresh ``dialer.connect(address, timeout=connect_timeout)``
    (:data:`vsockrpc.transport.DEFAULT_DIALER` unless given; giving one relays any address).
    A connection the relay can't open is closed, which grpcio reports as ``UNAVAILABLE`` (with
    the dial's error as details) and retries with backoff. ``relay=True`` relays any address
    (tests and benchmarks measure the relay with Unix sockets as its outer side), ``False``
    never does. An unclosed relayed channel is released when it is garbage-collected.
    """
    _, target, forwarder = route(
        address, connect_timeout=connect_timeout, relay=relay, dialer=dialer
    )
    inner = grpc.insecure_channel(target, options=[*DEFAULT_OPTIONS, *options])
    if forwarder is None:
        return inner
    return RelayChannel(inner, forwarder)


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
        last = ch.last_error if isinstance(ch, Relayed) else None
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
