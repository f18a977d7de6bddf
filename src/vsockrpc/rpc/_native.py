"""What the installed grpcio reaches by itself, shared by the client and the server side.

- :func:`native_vsock_supported`: does grpcio speak ``vsock:``? Probed by listening, never by
  connecting.
- :func:`native_target` / :func:`native_listen_target`: the target grpcio dials / binds for an
  address, or None when a relay has to carry it.
- :data:`DEFAULT_OPTIONS`: channel and server options vsockrpc always sets.
"""

from __future__ import annotations

import functools
import os
from concurrent import futures
from typing import Any

import grpc

from vsockrpc import transport
from vsockrpc.addresses import Address
from vsockrpc.rpc._quiet import capturing_stderr

__all__ = ["DEFAULT_OPTIONS", "native_listen_target", "native_target", "native_vsock_supported"]

# grpcio's default would honour $http_proxy for our loopback/guest addresses: never wanted here.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.enable_http_proxy", 0),)

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


def _supported(target: str | None) -> str | None:
    # Every grpcio build dials unix: and host:port; vsock: only when built with it.
    if target is None or (target.startswith("vsock:") and not native_vsock_supported()):
        return None
    return target


def native_target(address: Address) -> str | None:
    """The target grpcio dials for ``address``, or None when it must be relayed. Raises
    :class:`~vsockrpc.errors.AddressError` for an address that names no peer (CID -1)."""
    return _supported(transport.grpc_target(address))


def native_listen_target(address: Address) -> str | None:
    """The target grpcio binds for ``address`` (the way cleared: a stale socket file is
    removed), or None when a relay must listen instead."""
    return _supported(transport.prepare_grpc_listen(address))
