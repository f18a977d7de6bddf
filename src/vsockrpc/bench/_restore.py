"""Restore side of the ``boot`` part: a snapshot of a ready guest, restored as new VMs.

Phases of one restore (host monotonic clock, :meth:`RestoredVm.restore_phases`): ``start
qemu`` (lease, device child, QEMU up with ``-incoming defer`` while the RAM memfd is filled),
``load state`` (the fill awaited, ``migrate-incoming`` of the device state, QEMU version and
machine type checked), ``device re-plug`` (``chardev-add`` + ``device_add`` of a fresh device
serving the new CID), ``agent answers`` (the guest probes the device, a gRPC connection
succeeds; the probe is not timed apart: polling QEMU for the device's ``DRIVER_OK`` slowed
the guest by ~0.2 s), then ``Addition``
(Addition(5, 7) answered). ``fresh identity`` (clock, reseed, hostname through the agent) is
measured separately: it is not on the path to the first RPC.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from vsockrpc import rpc
from vsockrpc.errors import VsockRpcError
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

RESTORE_PHASES = [
    "start qemu",
    "load state",
    "device re-plug",
    "agent answers",
    "Addition",
]


def _addition(vm: Any) -> float:
    t = time.monotonic()
    with rpc.channel(vm.address()) as ch:
        stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
        if stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=60).c != 12:
            raise VsockRpcError("boot bench: Addition(5, 7) gave a wrong answer")
    return time.monotonic() - t


def take_snapshot(info: Any, into: Path) -> tuple[Path, dict[str, Any]]:
    """Boot a 1-vCPU guest, snapshot it into ``into`` and stop it; (snapshot, facts)."""
    from vsockrpc.sdk import Guest
    from vsockrpc.vm import launch, snapshot_vm

    with launch(info) as vm:
        with Guest(vm.address(), call_timeout=60) as g:
            facts = g.info()
        out = into / "snapshot"
        saved = snapshot_vm(vm.name, out, stop=True)
    used = facts.memory_total_bytes - facts.memory_available_bytes
    return out, {
        "snapshot bytes": saved.disk_bytes,
        "guest used RAM bytes": used,
        "guest paused s": saved.seconds,
    }


def one_restore(snapshot: Any) -> tuple[dict[str, float], float]:
    """(phases up to Addition, fresh-identity seconds) of one restore, then stop it."""
    from vsockrpc.vm import restore

    with restore(snapshot, verify=False) as vm:
        phases = vm.restore_phases()
        identity = phases.pop("fresh identity", 0.0)
        phases["Addition"] = _addition(vm)
    return phases, identity


def clones_at_once(snapshot: Any, count: int) -> str:
    """A line saying how long ``count`` clones restored at once took until all answered (the
    slowest clone's own restore time), or how it failed."""
    from vsockrpc.errors import VmError
    from vsockrpc.vm.restoring import restore_many

    t = time.monotonic()
    try:
        vms = restore_many(snapshot, count, verify=False, fresh_identity=False)
    except VmError as err:
        return f"{count} clones restored at once: FAILED after {time.monotonic() - t:.1f} s: {err}"
    took = time.monotonic() - t
    try:
        for vm in vms:
            _addition(vm)
        slowest = max((vm.timings.rpc_ready or 0.0) - vm.timings.launched for vm in vms)
    finally:
        for vm in vms:
            vm.stop()
    return (
        f"{count} clones restored at once: all answering Addition after {took:.2f} s "
        f"(slowest clone's own restore {slowest:.2f} s)"
    )


def temp_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="vsockrpc-bench-snap-")
