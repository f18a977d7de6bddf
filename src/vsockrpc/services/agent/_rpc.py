"""The servicers' gRPC edge: :class:`~._status.Status` and ``OSError`` become ``context.abort``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import grpc

from vsockrpc.services.agent._status import Code, Status, from_os_error

__all__ = ["abort", "statuses"]

log = logging.getLogger("vsockrpc.agent")


def abort(context: grpc.ServicerContext, code: Code, message: str) -> NoReturn:
    context.abort(grpc.StatusCode[code.name], message)
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
