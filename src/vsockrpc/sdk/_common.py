"""What the SDK's sub-clients share: path and argument types, and how a failed call reads."""

from __future__ import annotations

import os
import signal
from typing import Any

import grpc

from vsockrpc.agent import ENV_ALLOWED_CIDS, REFUSED_PEER_KEY, WINDOW_MAX
from vsockrpc.errors import AgentError, BadInputError

__all__ = [
    "CHUNK_SIZE",
    "Arg",
    "StrPath",
    "agent_error",
    "check_signal",
    "check_window",
    "fsencode",
    "unary",
]

CHUNK_SIZE = 1024 * 1024
"""Bytes per upload or stdin chunk (well under gRPC's 4 MiB message limit)."""

WHAT_MAX = 240
"""Characters of a call's description (its path, mostly) an error repeats."""

StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def fsencode(value: Arg) -> bytes:
    return os.fsencode(value)


def check_signal(signum: int) -> int:
    """``signum`` if it is a signal number, else :class:`BadInputError`. Checked here because a
    signal sent on an Exec stream has no answer of its own: the agent could only log it."""
    if isinstance(signum, bool) or not isinstance(signum, int) or not 0 < signum < signal.NSIG:
        raise BadInputError(f"not a signal number: {signum!r} (1 to {signal.NSIG - 1})")
    return signum


def check_window(rows: int, cols: int) -> tuple[int, int]:
    """A PTY window size, each side 1 to :data:`WINDOW_MAX`, else :class:`BadInputError`."""
    for value in (rows, cols):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= WINDOW_MAX:
            raise BadInputError(
                f"window size {rows!r}x{cols!r}: rows and columns must be 1 to {WINDOW_MAX}"
            )
    return rows, cols


def _refused_by_policy(err: grpc.RpcError) -> bool:
    """Whether the agent's peer policy refused the call (not e.g. a file it may not write)."""
    metadata = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else ()
    return any(key == REFUSED_PEER_KEY for key, _value in metadata or ())


def agent_error(err: grpc.RpcError, what: str) -> AgentError:
    """An :class:`AgentError` for a failed call, carrying the status code name."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    name = code.name if code is not None else "UNKNOWN"
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    hint = None
    if name == "UNAVAILABLE":
        hint = "is the guest running and its agent listening on that address?"
    elif name == "PERMISSION_DENIED" and _refused_by_policy(err):
        hint = f"the agent admits only allowed peers ({ENV_ALLOWED_CIDS} in the guest)"
    if len(what) > WHAT_MAX:  # "stat /aaaa..." with a caller's 100 KB path: one readable line
        what = f"{what[:WHAT_MAX]}... ({len(what)} characters)"
    return AgentError(f"{what}: {name}: {details}", code=name, hint=hint)


def unary(method: Any, request: Any, what: str, timeout: float) -> Any:
    """Call a unary ``method``; a failure becomes :class:`AgentError` naming ``what``."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as err:
        raise agent_error(err, what) from err
