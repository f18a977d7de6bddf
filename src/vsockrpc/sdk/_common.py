"""What the SDK's sub-clients share: path and argument types, and how a failed call reads."""

from __future__ import annotations

import os
from typing import Any

import grpc

from vsockrpc.agent import ENV_ALLOWED_CIDS, REFUSED_PEER_KEY
from vsockrpc.errors import AgentError

__all__ = ["CHUNK_SIZE", "Arg", "StrPath", "agent_error", "fsencode", "unary"]

CHUNK_SIZE = 1024 * 1024
"""Bytes per upload or stdin chunk (well under gRPC's 4 MiB message limit)."""

WHAT_MAX = 240
"""Characters of a call's description (its path, mostly) an error repeats."""

StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def fsencode(value: Arg) -> bytes:
    return os.fsencode(value)


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
