"""vsockrpc: gRPC services inside VMs, called from the host over vsock.

Layers (imports point down only) and what each may import: docs/architecture.md, checked by
tests/unit/test_architecture.py.
"""

from __future__ import annotations

import os as _os

# grpc core reads GRPC_VERBOSITY once, when grpc is imported: set the default before anything
# here imports it. Its "E1201 ..." lines repeat errors vsockrpc reports itself, in another
# format; GRPC_VERBOSITY=ERROR (or DEBUG) in the environment brings them back.
_os.environ.setdefault("GRPC_VERBOSITY", "NONE")

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
