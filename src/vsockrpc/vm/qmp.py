"""Short synchronous QMP commands through ``qemu.qmp`` (QEMU's own asyncio client).

One connection per command: QEMU's ``-qmp unix:…,server=on,wait=off`` takes one client at a
time, and a command-per-connection keeps no event loop or thread alive between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from vsockrpc.errors import VmError

try:
    from qemu.qmp import QMPClient, QMPError
except ImportError as err:  # a dependency of vsockrpc: missing only from a broken install
    raise VmError(
        "the Python package qemu.qmp (QEMU's QMP client) is not installed: "
        "the VM launcher needs it",
        hint=f"install it into this environment: {sys.executable} -m pip install qemu.qmp",
    ) from err

__all__ = ["CTRL_ALT_DEL", "qmp_command"]

# qemu.qmp logs every failed connection at ERROR before raising; the VmError raised here
# already says it (and stop() expects failures once the guest is gone), so keep it quiet.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

CTRL_ALT_DEL = {"keys": [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]}


async def _execute(socket_path: Path, command: str, args: dict[str, Any] | None) -> object:
    client = QMPClient("vsockrpc")
    await client.connect(str(socket_path))
    try:
        result = await client.execute(command, args)
    except BaseException:
        with contextlib.suppress(Exception):  # the command's own error is the one to raise
            await client.disconnect()
        raise
    # disconnect() re-raises what ended the connection's reader. QEMU may hang up as soon as
    # it has replied (``quit`` does: EOFError here about one time in six); the reply is in.
    with contextlib.suppress(EOFError, OSError, QMPError):
        await client.disconnect()
    return result


def qmp_command(
    socket_path: Path, command: str, args: dict[str, Any] | None = None, *, timeout: float = 5.0
) -> object:
    """Run one QMP command; :class:`VmError` when QEMU is unreachable or refuses it."""
    try:
        return asyncio.run(asyncio.wait_for(_execute(socket_path, command, args), timeout))
    except (OSError, EOFError, QMPError, TimeoutError) as err:
        raise VmError(f"QMP {command} failed: {err or type(err).__name__}") from err
