"""Map ``OSError`` and socket timeouts to :mod:`vsockrpc.errors` at the transport edge."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from vsockrpc.errors import (
    ConnectError,
    NotReadyError,
    TransportError,
    TransportTimeout,
    VsockRpcError,
)

__all__ = ["mapping_connect_errors", "mapping_listen_errors"]

# Errors meaning "nobody is accepting there yet": worth retrying with backoff.
# ECONNRESET is what a vsock connect() returns when the guest answers the REQUEST with RST
# (no listener on that port: net/vmw_vsock/virtio_transport_common.c).
_NOT_READY = {errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.ECONNABORTED}


@contextmanager
def mapping_connect_errors(what: str) -> Iterator[None]:
    """Re-raise errors of a connect to ``what`` as NotReadyError/TransportTimeout/ConnectError."""
    try:
        yield
    except VsockRpcError:
        raise  # already mapped (e.g. a hybrid handshake error raised inside the block)
    except TimeoutError as err:  # socket.timeout is TimeoutError since 3.10
        raise TransportTimeout(f"timed out connecting to {what}") from err
    except OSError as err:
        message = f"cannot connect to {what}: {err.strerror or err}"
        if err.errno in _NOT_READY:
            raise NotReadyError(message) from err
        raise ConnectError(message) from err


@contextmanager
def mapping_listen_errors(what: str) -> Iterator[None]:
    """Re-raise errors of a bind/listen on ``what`` as TransportError."""
    try:
        yield
    except OSError as err:
        hint = None
        if err.errno == errno.EADDRINUSE:
            hint = "another process is listening there; pick another address or stop it"
        elif err.errno == errno.EACCES:
            hint = "permission denied; ports below 1024 need privileges"
        raise TransportError(f"cannot listen on {what}: {err.strerror or err}", hint=hint) from err
