"""Launching guests: QEMU command line, accelerator and vsock-device choice, CID allocation,
lifecycle over QMP, readiness.

    with vsockrpc.vm.launch(image) as vm:       # booted, agent answering
        vm.address()                            # hvsock:/run/vsockrpc/vms/vm3/vsock.sock:9999
        vm.console_text()
"""

from __future__ import annotations

from vsockrpc.vm.launcher import DEFAULT_PORT, Timings, Vm, launch

__all__ = ["DEFAULT_PORT", "Timings", "Vm", "launch"]
