"""``vsockrpc.rpc.aio.channel()``: the asyncio flavour of :func:`vsockrpc.rpc.channel`.

The same implementation (:func:`vsockrpc.rpc.channel.route` and
:class:`~vsockrpc.rpc.channel.Relayed`): the relay is thread-based and independent of the event
loop, so an asyncio client gets the same relaying; closing the channel stops the relay (its
threads are joined off the loop), and an unclosed one is released when collected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from vsockrpc.addresses import Address
from vsockrpc.rpc._client import ClientRelay
from vsockrpc.rpc._native import DEFAULT_OPTIONS
from vsockrpc.rpc.channel import DEFAULT_CONNECT_TIMEOUT, Relayed, route
from vsockrpc.transport import Dialer

__all__ = ["AioRelayChannel", "channel"]


class AioRelayChannel(Relayed, grpc.aio.Channel):  # type: ignore[misc]  # grpc ships no types
    """A ``grpc.aio`` channel whose connections a relay forwards to ``address``."""

    _aio = True

    def __init__(self, inner: grpc.aio.Channel, forwarder: ClientRelay) -> None:
        self._inner = inner
        # Collected unclosed: grpc.aio closes its own channel; the relay is ours to stop.
        self._attach(forwarder, forwarder.close)

    async def __aenter__(self) -> AioRelayChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        await self._inner.close(grace)
        await asyncio.to_thread(self._finalizer)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._inner.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._inner.unary_unary(method, *args, **kwargs), "unary_unary")

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._inner.unary_stream(method, *args, **kwargs), "unary_stream")

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._inner.stream_unary(method, *args, **kwargs), "stream_unary")

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._inner.stream_stream(method, *args, **kwargs), "stream_stream")


def channel(
    address: Address | str,
    *,
    options: Sequence[tuple[str, Any]] = (),
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    relay: bool | None = None,
    dialer: Dialer | None = None,
) -> grpc.aio.Channel:
    """Like :func:`vsockrpc.rpc.channel`, for ``grpc.aio``; use ``async with``."""
    _, target, forwarder = route(
        address, connect_timeout=connect_timeout, relay=relay, dialer=dialer
    )
    inner = grpc.aio.insecure_channel(target, options=[*DEFAULT_OPTIONS, *options])
    if forwarder is None:
        return inner
    return AioRelayChannel(inner, forwarder)
