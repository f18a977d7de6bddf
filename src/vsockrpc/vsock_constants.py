"""The AF_VSOCK constants, defined once (Linux ``include/uapi/linux/vm_sockets.h``).

Dependency-free on purpose: the address grammar, the transports, the agent and the userspace
device (which imports nothing gRPC) all take them from here.
"""

from __future__ import annotations

__all__ = [
    "MAX_PORT",
    "RESERVED_GUEST_CIDS",
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VMADDR_CID_HYPERVISOR",
    "VMADDR_CID_LOCAL",
    "VMADDR_PORT_ANY",
]

VMADDR_CID_ANY = 0xFFFFFFFF
"""Bind to any CID (listening only; names no peer)."""
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
"""Loopback within one kernel (vsock_loopback)."""
VMADDR_CID_HOST = 2
"""The host, as seen from a guest."""
VMADDR_PORT_ANY = 0xFFFFFFFF
"""Bind to any free port (the kernel picks one)."""
MAX_PORT = VMADDR_PORT_ANY - 1
"""The largest port one can name: a u32 that is not VMADDR_PORT_ANY (0 names no port either)."""

RESERVED_GUEST_CIDS = frozenset(
    {VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL, VMADDR_CID_HOST, VMADDR_CID_ANY}
)
"""CIDs a guest may not be given (virtio spec 1.2, 5.10.4 "Device configuration layout")."""
