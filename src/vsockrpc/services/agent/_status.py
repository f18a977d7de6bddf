"""Expected failures of the agent, without gRPC: a :class:`Status` carrying a :class:`Code`.

Agent code raises :class:`Status` (or lets an ``OSError`` escape, mapped by errno with
:func:`from_os_error`); the servicers turn both into ``context.abort`` (:mod:`._rpc`), so every
expected failure reaches the client as a proper status code with a one-line message and the
agent keeps serving. The process manager uses this too and so stays free of grpc.
"""

from __future__ import annotations

import enum
import errno
import os

__all__ = ["Code", "Status", "check_path", "from_os_error", "show"]


class Code(enum.Enum):
    """The status codes the agent answers with; the names are gRPC's (``grpc.StatusCode``)."""

    INVALID_ARGUMENT = enum.auto()
    NOT_FOUND = enum.auto()
    ALREADY_EXISTS = enum.auto()
    PERMISSION_DENIED = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    UNIMPLEMENTED = enum.auto()
    INTERNAL = enum.auto()
    DATA_LOSS = enum.auto()


_ERRNO_CODES: dict[int, Code] = {
    errno.ENOENT: Code.NOT_FOUND,
    errno.EACCES: Code.PERMISSION_DENIED,
    errno.EPERM: Code.PERMISSION_DENIED,
    errno.EROFS: Code.PERMISSION_DENIED,
    errno.EEXIST: Code.ALREADY_EXISTS,
    errno.ENOTDIR: Code.FAILED_PRECONDITION,
    errno.EISDIR: Code.FAILED_PRECONDITION,
    errno.ENOTEMPTY: Code.FAILED_PRECONDITION,
    errno.EXDEV: Code.FAILED_PRECONDITION,
    errno.ELOOP: Code.FAILED_PRECONDITION,
    errno.EBUSY: Code.FAILED_PRECONDITION,
    errno.ETXTBSY: Code.FAILED_PRECONDITION,
    errno.ENOEXEC: Code.FAILED_PRECONDITION,
    errno.ENAMETOOLONG: Code.INVALID_ARGUMENT,
    errno.EINVAL: Code.INVALID_ARGUMENT,
    errno.E2BIG: Code.INVALID_ARGUMENT,
    errno.ENOSPC: Code.RESOURCE_EXHAUSTED,
    errno.EDQUOT: Code.RESOURCE_EXHAUSTED,
    errno.EMFILE: Code.RESOURCE_EXHAUSTED,
    errno.ENFILE: Code.RESOURCE_EXHAUSTED,
    errno.ENOMEM: Code.RESOURCE_EXHAUSTED,
    errno.EAGAIN: Code.RESOURCE_EXHAUSTED,
}


class Status(Exception):
    """An expected failure with the status code the client should see."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


SHOW_MAX = 200
"""Characters of a caller's value a message repeats: a status message travels in a header,
and one over gRPC's 16 KiB metadata limit reached the client as RESOURCE_EXHAUSTED instead."""


def show(path: bytes | str) -> str:
    """A path (or name, or id) for a message: decoded with surrogateescape, quoted, cut to
    :data:`SHOW_MAX` characters, never raising."""
    text = os.fsdecode(path) if isinstance(path, bytes) else path
    if len(text) > SHOW_MAX:
        return f"{text[:SHOW_MAX]!r}... ({len(text)} characters)"
    return repr(text)


def from_os_error(err: OSError, what: str = "") -> Status:
    """The :class:`Status` for ``err`` (by errno), naming ``what`` (or the error's filename)."""
    code = _ERRNO_CODES.get(err.errno or 0, Code.INTERNAL)
    subject = what or (show(err.filename) if err.filename is not None else "")
    reason = err.strerror or str(err)
    return Status(code, f"{subject}: {reason}" if subject else reason)


def check_path(raw: bytes, what: str = "path") -> bytes:
    """An absolute path without NUL bytes, else INVALID_ARGUMENT."""
    if not raw:
        raise Status(Code.INVALID_ARGUMENT, f"{what} is empty")
    if b"\0" in raw:
        raise Status(Code.INVALID_ARGUMENT, f"{what} {show(raw)} contains a NUL byte")
    if not raw.startswith(b"/"):
        raise Status(Code.INVALID_ARGUMENT, f"{what} {show(raw)} is not absolute")
    return raw
