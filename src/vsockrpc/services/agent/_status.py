"""Turning failures into gRPC statuses: one exception carrying a status, OSError mapped by errno.

Servicer code raises :class:`Status` (or lets an ``OSError`` escape); :func:`statuses` converts
both to ``context.abort(code, message)`` so every expected failure reaches the client as a proper
status code with a one-line message, and the agent keeps serving.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import grpc

log = logging.getLogger("vsockrpc.agent")

_ERRNO_CODES: dict[int, grpc.StatusCode] = {
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EROFS: grpc.StatusCode.PERMISSION_DENIED,
    errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    errno.ENOTDIR: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EISDIR: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ENOTEMPTY: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EXDEV: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ELOOP: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EBUSY: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ETXTBSY: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ENOEXEC: grpc.StatusCode.FAILED_PRECONDITION,
    errno.ENAMETOOLONG: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    errno.E2BIG: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EMFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EAGAIN: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Status(Exception):
    """An expected failure with the gRPC status code the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def show(path: bytes | str) -> str:
    """A path for a message: decoded with surrogateescape, quoted, never raising."""
    text = os.fsdecode(path) if isinstance(path, bytes) else path
    return repr(text)


def from_os_error(err: OSError, what: str = "") -> Status:
    """The :class:`Status` for ``err`` (by errno), naming ``what`` (or the error's filename)."""
    code = _ERRNO_CODES.get(err.errno or 0, grpc.StatusCode.INTERNAL)
    subject = what or (show(err.filename) if err.filename is not None else "")
    reason = err.strerror or str(err)
    return Status(code, f"{subject}: {reason}" if subject else reason)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


@contextmanager
def statuses(context: grpc.ServicerContext, method: str) -> Iterator[None]:
    """Convert :class:`Status` and ``OSError`` raised in the block to ``context.abort``."""
    try:
        yield
    except Status as err:
        log.info("%s failed: %s %s", method, err.code.name, err.message)
        abort(context, err.code, err.message)
    except OSError as err:
        status = from_os_error(err)
        log.info("%s failed: %s %s", method, status.code.name, status.message)
        abort(context, status.code, status.message)


def check_path(raw: bytes, what: str = "path") -> bytes:
    """An absolute path without NUL bytes, else INVALID_ARGUMENT."""
    if not raw:
        raise Status(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is empty")
    if b"\0" in raw:
        raise Status(grpc.StatusCode.INVALID_ARGUMENT, f"{what} {show(raw)} contains a NUL byte")
    if not raw.startswith(b"/"):
        raise Status(grpc.StatusCode.INVALID_ARGUMENT, f"{what} {show(raw)} is not absolute")
    return raw
