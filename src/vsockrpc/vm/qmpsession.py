"""A QMP session that lives for a whole procedure (snapshot, restore): several commands and
the events between them (``DEVICE_DELETED``, the end of a migration) on one connection.

:mod:`.qmp` runs one command per connection; a snapshot or a restore needs a sequence on one
connection with its events in order, so these coroutines share one ``QMPClient`` and run
under a single ``asyncio.run`` (:func:`run_session`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from vsockrpc.errors import VmError
from vsockrpc.vm import qmp as _qmp  # noqa: F401  (a clear error when qemu.qmp is missing)

__all__ = ["Session", "run_session"]

T = TypeVar("T")
MIGRATION_POLL = 0.01  # s between query-migrate polls
CONNECT_GRACE = 10.0  # s a QMP socket may refuse connections after it appeared
CONNECT_RETRY = 0.02


class Session:
    def __init__(self, client: QMPClient) -> None:
        self.client = client

    async def run(self, command: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self.client.execute(command, args)
        except QMPError as err:
            raise VmError(f"QMP {command} failed: {err}") from err

    async def unplug(self, device: str, timeout: float = 10.0) -> None:
        """``device_del`` and wait for its ``DEVICE_DELETED`` (the guest released it)."""
        with self.client.listener(("DEVICE_DELETED",)) as events:
            await self.run("device_del", {"id": device})

            async def deleted() -> None:
                async for event in events:
                    data: Any = event.get("data", {})
                    if data.get("device") == device:
                        return

            try:
                await asyncio.wait_for(deleted(), timeout)
            except TimeoutError:
                raise VmError(
                    f"the guest did not release device {device} in {timeout:g} s"
                ) from None

    async def wait_migration(self, timeout: float) -> None:
        """Until ``query-migrate`` says completed; VmError with QEMU's reason when it failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.run("query-migrate")
            state = status.get("status")
            if state == "completed":
                return
            if state in ("failed", "cancelled"):
                raise VmError(f"migration {state}: {status.get('error-desc', 'no reason given')}")
            if loop.time() > deadline:
                raise VmError(f"migration not done after {timeout:g} s (state {state})")
            await asyncio.sleep(MIGRATION_POLL)


async def _connect(qmp_socket: Path) -> QMPClient:
    """Connect, retrying "connection refused" for :data:`CONNECT_GRACE` s: QEMU binds its
    QMP socket (the file appears) before it listens on it, and on a loaded host a freshly
    started QEMU can sit between the two for a while (seen with ten clones starting at once).
    A new client per attempt: one whose connect failed does not connect cleanly again."""
    deadline = asyncio.get_running_loop().time() + CONNECT_GRACE
    while True:
        client = QMPClient("vsockrpc")
        try:
            await client.connect(str(qmp_socket))
            return client
        except (OSError, QMPError) as err:
            refused = isinstance(err.__cause__ or err, ConnectionRefusedError)
            if not refused or asyncio.get_running_loop().time() > deadline:
                raise VmError(f"cannot reach QEMU's QMP socket: {err}") from err
        await asyncio.sleep(CONNECT_RETRY)


def run_session(
    qmp_socket: Path, body: Callable[[Session], Awaitable[T]], *, timeout: float = 300.0
) -> T:
    """Connect to QEMU's QMP socket, run ``body``, disconnect."""

    async def main() -> T:
        client = await _connect(qmp_socket)
        try:
            return await body(Session(client))
        finally:
            # QEMU may quit (or drop us) after the last command: nothing left to close then.
            with contextlib.suppress(OSError, QMPError, EOFError):
                await client.disconnect()

    try:
        return asyncio.run(asyncio.wait_for(main(), timeout))
    except TimeoutError as err:
        raise VmError(f"QMP session did not finish in {timeout:g} s") from err
