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

from vsockrpc.vm.launcher import DEFAULT_PORT, Timings, Vm, launch
from vsockrpc.vm.pool import Pool
from vsockrpc.vm.restore import RestoredVm, Snapshot, load_snapshot, restore, restore_many
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
