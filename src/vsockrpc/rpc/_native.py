"""Does the installed grpcio speak ``vsock:`` itself? Probed by listening, never by connecting."""

from __future__ import annotations

import functools
import os
from concurrent import futures

import grpc

from vsockrpc.rpc._quiet import capturing_stderr

__all__ = ["native_vsock_supported"]

# CID -1 = VMADDR_CID_ANY, port 2**32-1 = VMADDR_PORT_ANY (the kernel picks a free one, so no
# privileged port and no clash). grpc parses both with "%u:%u".
_PROBE_TARGET = "vsock:4294967295:4294967295"
_ENV_OVERRIDE = "VSOCKRPC_NATIVE_VSOCK"


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
        with capturing_stderr():  # the failed bind's log line is expected: drop it
            server.add_insecure_port(_PROBE_TARGET)
    except RuntimeError:
        return False
    finally:
        server.stop(None)
    return True
