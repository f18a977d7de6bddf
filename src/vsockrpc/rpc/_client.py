"""The client side of the relay: one relayed destination per channel, and its calls' errors.

A :class:`ClientRelay` listens on a fresh socket in the process's shared private directory
(:func:`vsockrpc.rpc._private.acquire_shared_dir`) and opens each connection grpcio makes there with
its :class:`~vsockrpc.transport.Dialer`. grpcio only ever sees that private socket, so when a
dial fails its errors name it (``unix:/tmp/vsockrpc-…/relay-1: recvmsg: Connection reset``);
:meth:`ClientRelay.fix` turns such an error into one naming the real address and the real cause
(``cannot connect to hvsock:/run/vm.sock:9999: No such file or directory``), and the
multicallable wrappers below apply it to every call of a relayed channel. The wrappers also
hold the channel, so a stub keeps its channel (and relay) alive like a grpcio stub does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import grpc
import grpc.aio

from vsockrpc.addresses import Address
from vsockrpc.errors import VsockRpcError
from vsockrpc.rpc._private import acquire_shared_dir, release_shared_dir
from vsockrpc.rpc._relay import Passed, Relay
from vsockrpc.transport import Dialer, dial_for
from vsockrpc.transport import unix as unix_transport

__all__ = ["ClientRelay", "RelayedRpcError", "wrap_multicallable"]

Fix = Callable[[grpc.RpcError], grpc.RpcError]


class ClientRelay:
    """grpcio dials :attr:`target`; every connection there is forwarded to ``address``."""

    def __init__(self, address: Address, dialer: Dialer, connect_timeout: float | None) -> None:
        self.address = address
        self.last_error: str | None = None
        self._shared = acquire_shared_dir()
        self._directory = self._shared.path
        self.path = self._shared.fresh("relay")
        self.target = unix_transport.grpc_target_for_path(self.path)

        def dial(conn: socket.socket, _peer: object) -> socket.socket | Passed:
            try:
                sock, passed = dial_for(dialer, address, conn, timeout=connect_timeout)
            except (VsockRpcError, OSError) as err:
                self.last_error = str(err)
                raise
            self.last_error = None
            return Passed(sock) if passed else sock

        try:
            listener = unix_transport.listen_path(self.path)
        except BaseException:
            release_shared_dir(self._shared)
            raise
        self.relay = Relay(listener, dial, name=f"channel {address}")
        self.relay.start()
        self._closed = False

    def close(self) -> None:
        """Stop the relay (breaking its live connections) and remove its socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        if threading.current_thread().name.startswith("vsockrpc-"):
            # Collected inside one of the relay's own threads, which can't join themselves.
            threading.Thread(target=self._stop, name="vsockrpc-relay-close", daemon=True).start()
        else:
            self._stop()

    def _stop(self) -> None:
        self.relay.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        release_shared_dir(self._shared)

    def fix(self, err: grpc.RpcError) -> grpc.RpcError:
        """``err`` with the private socket replaced by the real address and cause."""
        details = err.details() if callable(getattr(err, "details", None)) else None
        if not isinstance(details, str) or self._directory not in details:
            return err
        cause = self.last_error or details.replace(self.target, str(self.address))
        if isinstance(err, grpc.aio.AioRpcError):  # what asyncio callers catch
            return grpc.aio.AioRpcError(
                err.code(), err.initial_metadata(), err.trailing_metadata(), cause, cause
            )
        return RelayedRpcError(err, cause)


class RelayedRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]  # grpc ships no types
    """A failed call of a relayed channel: the original's status, details naming the real cause
    (the original stays in :attr:`original`)."""

    def __init__(self, original: grpc.RpcError, details: str) -> None:
        super().__init__(details)
        self.original = original
        self._details = details

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self.original.code()
        return code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return self.original.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self.original.trailing_metadata()

    def debug_error_string(self) -> str:
        return self._details

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def __str__(self) -> str:
        return f"<RpcError {self.code()}: {self._details}>"


class _Call:
    """A call object (Call + Future + iterator for streams) whose errors go through ``fix``."""

    __slots__ = ("_call", "_fix")

    def __init__(self, call: Any, fix: Fix) -> None:
        self._call = call
        self._fix = fix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise self._fix(err) from None

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._call.result(timeout)
        except grpc.RpcError as err:
            raise self._fix(err) from None

    def exception(self, timeout: float | None = None) -> Any:
        err = self._call.exception(timeout)
        return self._fix(err) if isinstance(err, grpc.RpcError) else err

    def details(self) -> Any:
        if isinstance(self._call, grpc.RpcError):
            return self._fix(self._call).details()
        return self._call.details()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _call: fn(self))


class _AioCall:
    """A ``grpc.aio`` call object whose errors go through ``fix`` (awaited or iterated)."""

    __slots__ = ("_call", "_fix")

    def __init__(self, call: Any, fix: Fix) -> None:
        self._call = call
        self._fix = fix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def __await__(self) -> Generator[Any, None, Any]:
        try:
            return (yield from self._call.__await__())
        except grpc.aio.AioRpcError as err:
            raise self._fix(err) from None

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for item in self._call:
                yield item
        except grpc.aio.AioRpcError as err:
            raise self._fix(err) from None

    async def read(self) -> Any:
        try:
            return await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise self._fix(err) from None


class _Multicallable:
    """Any of grpcio's four multicallables, holding the channel that made it."""

    __slots__ = ("_fix", "_inner", "_owner", "_wrap")

    def __init__(self, inner: Any, fix: Fix, owner: object, wrap: Wrap | None) -> None:
        self._inner = inner
        self._fix = fix
        self._owner = owner  # keeps the channel, and so its relay, alive while a stub is
        self._wrap = wrap

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = self._inner(*args, **kwargs)
        except grpc.RpcError as err:
            raise self._fix(err) from None
        return result if self._wrap is None else self._wrap(result, self._fix)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response, call = self._inner.with_call(*args, **kwargs)
        except grpc.RpcError as err:
            raise self._fix(err) from None
        return response, call

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return _Call(self._inner.future(*args, **kwargs), self._fix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


Wrap = Callable[[Any, Fix], Any]


def wrap_multicallable(inner: Any, fix: Fix, owner: object, *, kind: str, aio: bool) -> Any:
    """``inner`` (a multicallable of ``kind``, e.g. ``"unary_stream"``) with errors going through
    ``fix`` and ``owner`` kept alive. What a call returns is wrapped only where it can still
    fail later: every ``grpc.aio`` call, sync streaming responses; a sync unary call returns
    the response itself (or raises), so nothing is added to it."""
    wrap: Wrap | None = _AioCall if aio else _Call if kind.endswith("_stream") else None
    return _Multicallable(inner, fix, owner, wrap)
