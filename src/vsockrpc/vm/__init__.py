"""Launching guests: QEMU command line, accelerator and vsock-device choice, CID allocation,
lifecycle over QMP, readiness.

    with vsockrpc.vm.launch(image) as vm:       # booted, agent answering
        vm.address()                            # hvsock:/run/vsockrpc/vms/vm3/vsock.sock:9999
        vm.console_text()

    snapshot_vm("vm3", "snap/")                 # save a ready guest, resume it
    with vsockrpc.vm.restore("snap/") as clone: # a new VM (own CID) from it, agent answering
        clone.address()
"""

from __future__ import annotations

from vsockrpc.vm.launcher import DEFAULT_PORT, Timings, Vm, launch
from vsockrpc.vm.restore import RestoredVm, Snapshot, load_snapshot, restore
from vsockrpc.vm.snapshot import snapshot_vm

__all__ = [
    "DEFAULT_PORT",
    "RestoredVm",
    "Snapshot",
    "Timings",
    "Vm",
    "launch",
    "load_snapshot",
    "restore",
    "snapshot_vm",
]
