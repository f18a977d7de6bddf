"""vsockrpc: gRPC services inside VMs, called from the host over vsock.

Layers (import downward only): ``cli`` → ``vm`` → ``image`` / ``vhost`` → ``guest`` →
``services`` → ``rpc`` → ``transport`` → ``addresses`` / ``errors``. See ARCHITECTURE in the
README.
"""

from __future__ import annotations

from vsockrpc.addresses import (
    Address,
    HybridAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from vsockrpc.errors import VsockRpcError

__version__ = "0.1.0"

__all__ = [
    "Address",
    "HybridAddress",
    "TcpAddress",
    "UnixAddress",
    "VsockAddress",
    "VsockRpcError",
    "__version__",
    "parse_address",
]
