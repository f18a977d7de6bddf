"""Does the installed grpcio speak ``vsock:`` itself? Probed by listening, never by connecting."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures

import grpc

__all__ = ["native_vsock_supported"]

# CID -1 = VMADDR_CID_ANY, port 2**32-1 = VMADDR_PORT_ANY (the kernel picks a free one, so no
# privileged port and no clash). grpc parses both with "%u:%u".
_PROBE_TARGET = "vsock:4294967295:4294967295"
_ENV_OVERRIDE = "VSOCKRPC_NATIVE_VSOCK"


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Point fd 2 at a scratch file: grpc core logs the failed bind there (``E... add_port.cc``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@functools.cache
def native_vsock_supported() -> bool:
    """True when grpcio can bind ``vsock:`` addresses itself (cached for the process).

    ``VSOCKRPC_NATIVE_VSOCK=0`` forces the relay, ``=1`` forces native use.
    """
    forced = os.environ.get(_ENV_OVERRIDE)
    if forced in ("0", "1"):
        return forced == "1"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with _stderr_silenced():
            server.add_insecure_port(_PROBE_TARGET)
    except RuntimeError:
        return False
    finally:
        server.stop(None)
    return True
