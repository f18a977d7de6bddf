"""Launching guests: QEMU command line, accelerator and vsock-device choice, CID allocation,
lifecycle over QMP, readiness.

    with vsockrpc.vm.launch(image) as vm:       # booted, agent answering
        vm.address()                            # hvsock:/run/vsockrpc/vms/vm3/vsock.sock:9999
        vm.console_text()

    snapshot_vm("vm3", "snap/")                 # save a ready guest, resume it
    with vsockrpc.vm.restore("snap/") as clone: # a new VM (own CID) from it, agent answering
        clone.address()
    with vsockrpc.vm.Pool("snap/", size=2) as pool:   # warm clones, replenished in the background
        with pool.acquire() as vm: ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vsockrpc.vm.launcher import DEFAULT_PORT, Timings, Vm, launch
    from vsockrpc.vm.pool import Pool
    from vsockrpc.vm.restoring import RestoredVm, Snapshot, load_snapshot, restore, restore_many
    from vsockrpc.vm.snapshot import snapshot_vm

__all__ = [
    "DEFAULT_PORT",
    "Pool",
    "RestoredVm",
    "Snapshot",
    "Timings",
    "Vm",
    "launch",
    "load_snapshot",
    "restore",
    "restore_many",
    "snapshot_vm",
]

# The public names load their module on first use (PEP 562): the launcher pulls in grpc and the
# SDK, which ``vm list``/``vm stop`` (vsockrpc.vm.registry, a submodule) never need.
_HOMES = {
    "DEFAULT_PORT": "launcher",
    "Timings": "launcher",
    "Vm": "launcher",
    "launch": "launcher",
    "Pool": "pool",
    "RestoredVm": "restoring",
    "Snapshot": "restoring",
    "load_snapshot": "restoring",
    "restore": "restoring",
    "restore_many": "restoring",
    "snapshot_vm": "snapshot",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
