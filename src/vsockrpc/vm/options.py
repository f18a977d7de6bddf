"""Up-front validation of what a user asks a VM to be: name, CID, port, size, timeout.

Everything here runs before anything is created (no lease, no directory, no process), so a bad
value costs nothing and is reported as one line naming the value and the limit. A bad value is
a usage error (:class:`InvalidVmOption`, exit 2 in the CLI), not a failed operation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from vsockrpc.agent import VM_NAME
from vsockrpc.errors import BadInputError, VmError
from vsockrpc.vhost.groups import GROUP_NAME
from vsockrpc.vsock_constants import MAX_PORT

__all__ = [
    "MAX_CPUS",
    "MAX_GUEST_CID",
    "MAX_PORT",
    "MIN_GUEST_CID",
    "MIN_MEMORY_MIB",
    "InvalidVmOption",
    "check_cid",
    "check_groups",
    "check_launch",
    "check_name",
    "check_ready_timeout",
    "check_which",
]

MIN_GUEST_CID = 3  # 0 hypervisor, 1 local loopback, 2 host (include/uapi/linux/vm_sockets.h)
MAX_GUEST_CID = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_CID_ANY
# Below ~128 MiB the guest kernel plus the agent's Python does not come up (it stalls before
# the console prints anything rather than failing), so such a size is refused up front.
MIN_MEMORY_MIB = 128
# QEMU 7.2's q35 under TCG: more than 255 vCPUs needs x2APIC with a kernel irqchip.
MAX_CPUS = 255
MAX_TIMEOUT = 24 * 3600.0


class InvalidVmOption(VmError, BadInputError, ValueError):
    """A VM option is malformed or out of range (bad input: the CLI exits 2)."""


def check_name(name: str) -> str:
    """``name`` when it is a valid VM name, else :class:`InvalidVmOption`."""
    if not VM_NAME.fullmatch(name):
        raise InvalidVmOption(
            f"VM name {name!r} is invalid: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_groups(groups: Sequence[str], *, trust_group: bool = False) -> tuple[str, ...]:
    """The VM's groups, each once and in order; :class:`InvalidVmOption` for a bad name, or
    for ``trust_group`` without a group (there would be no one to trust)."""
    for group in groups:
        if not GROUP_NAME.match(group):  # the device's own rule: one path component
            raise InvalidVmOption(
                f"group name {group!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
    if trust_group and not groups:
        raise InvalidVmOption("--trust-group needs --group (the group whose members to admit)")
    return tuple(dict.fromkeys(groups))


def check_which(which: str) -> str:
    """A ``vm stop``/``vm list`` selector: a VM name or a CID (both fit the name charset)."""
    return check_name(which)


def check_cid(cid: int) -> int:
    if not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
        raise InvalidVmOption(
            f"guest CID {cid} is invalid: use {MIN_GUEST_CID}..{MAX_GUEST_CID} "
            "(0-2 are reserved, 4294967295 means any)"
        )
    return cid


def _host_memory_mib() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (OSError, ValueError):
        return 1 << 30  # unknown: do not refuse anything a 64-bit host could have


def check_ready_timeout(ready_timeout: float) -> float:
    """Seconds to wait for the agent: a finite number in (0, MAX_TIMEOUT]."""
    if not (math.isfinite(ready_timeout) and 0 < ready_timeout <= MAX_TIMEOUT):
        raise InvalidVmOption(
            f"timeout {ready_timeout!r} s is invalid: use a number of seconds in "
            f"(0, {MAX_TIMEOUT:g}]"
        )
    return ready_timeout


def check_launch(
    *,
    name: str | None,
    cid: int | None,
    port: int,
    memory_mib: int,
    cpus: int,
    ready_timeout: float,
    groups: Sequence[str] = (),
    trust_group: bool = False,
) -> None:
    """Validate :func:`vsockrpc.vm.launch`'s arguments; :class:`InvalidVmOption` on the first
    bad one."""
    check_groups(groups, trust_group=trust_group)
    if name is not None:
        check_name(name)
    if cid is not None:
        check_cid(cid)
    if not 1 <= port <= MAX_PORT:
        raise InvalidVmOption(f"agent port {port} is invalid: use 1..{MAX_PORT}")
    host = _host_memory_mib()
    if not MIN_MEMORY_MIB <= memory_mib <= host:
        raise InvalidVmOption(
            f"memory {memory_mib} MiB is invalid: use {MIN_MEMORY_MIB}..{host} MiB "
            f"(the guest needs at least {MIN_MEMORY_MIB}; this host has {host})"
        )
    if not 1 <= cpus <= MAX_CPUS:
        raise InvalidVmOption(f"{cpus} CPUs is invalid: use 1..{MAX_CPUS}")
    check_ready_timeout(ready_timeout)
