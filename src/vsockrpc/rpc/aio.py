"""``vsockrpc.rpc.aio.channel()``: the asyncio flavour of :func:`vsockrpc.rpc.channel`.

The relay is thread-based and independent of the event loop, so an asyncio client gets the
same relaying; closing the channel stops the relay (its threads are joined off the loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from vsockrpc.addresses import Address, VsockAddress, parse_address
from vsockrpc.errors import TransportError
from vsockrpc.rpc._private import PrivateDir
from vsockrpc.rpc._relay import Relay
from vsockrpc.rpc.channel import DEFAULT_CONNECT_TIMEOUT, open_relay
from vsockrpc.rpc.server import DEFAULT_OPTIONS, native_target
from vsockrpc.transport import vsock as vsock_transport

__all__ = ["AioRelayChannel", "channel"]


class AioRelayChannel(grpc.aio.Channel):  # type: ignore[misc]  # grpc ships no type information
    """A ``grpc.aio`` channel whose connections a relay forwards to ``address``."""

    def __init__(
        self, inner: grpc.aio.Channel, relay: Relay, private_dir: PrivateDir, address: Address
    ) -> None:
        self._inner = inner
        self._relay = relay
        self._private_dir = private_dir
        self.address = address

    @property
    def relay(self) -> Relay:
        return self._relay

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
        await asyncio.to_thread(self._relay.close)
        self._private_dir.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._inner.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.stream_stream(method, *args, **kwargs)


def channel(
    address: Address | str,
    *,
    options: Sequence[tuple[str, Any]] = (),
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    relay: bool | None = None,
) -> grpc.aio.Channel:
    """Like :func:`vsockrpc.rpc.channel`, for ``grpc.aio``; use ``async with``."""
    parsed = parse_address(address)
    if isinstance(parsed, VsockAddress):
        vsock_transport.sockaddr_for_connect(parsed)
    all_options = [*DEFAULT_OPTIONS, *options]
    target = native_target(parsed)
    if relay is False and target is None:
        raise TransportError(f"grpcio cannot dial {parsed} without the relay")
    if target is not None and not relay:
        return grpc.aio.insecure_channel(target, options=all_options)
    forwarder, private_dir, path = open_relay(parsed, connect_timeout)
    inner = grpc.aio.insecure_channel(f"unix:{path}", options=all_options)
    return AioRelayChannel(inner, forwarder, private_dir, parsed)
