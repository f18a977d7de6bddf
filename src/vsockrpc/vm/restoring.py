"""Restoring a snapshot (:mod:`.snapshot`) as a new VM: its own CID, name and device.

    with vsockrpc.vm.restore("snap/") as vm:    # loaded, device plugged, agent answering
        vm.address()

Checked before anything is started (one line each): the directory is a complete snapshot
(``manifest.json``, every file with its recorded size and sha256), its image still exists with
the same manifest digest. Then QEMU starts with ``-incoming defer`` and the same boot
configuration; its version and machine type are compared over QMP *before* any state is
loaded (a mismatch stops it again, the guest never ran). ``migrate-incoming`` loads the RAM
and device state; with the userspace device a fresh device process serving the new CID is
plugged in (``chardev-add`` + ``device_add`` on the root port). The agent's vsock listener
survives the device going away and coming back; connections open at snapshot time do not.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from vsockrpc import rpc
from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import ImageError, VmError
from vsockrpc.image import ImageInfo, find_image
from vsockrpc.vm import cid as cid_mod
from vsockrpc.vm import signals
from vsockrpc.vm.accel import Accel
from vsockrpc.vm.console import ConsoleFollower
from vsockrpc.vm.identity import refresh_identity
from vsockrpc.vm.launcher import Vm
from vsockrpc.vm.options import (
    InvalidVmOption,
    check_cid,
    check_groups,
    check_name,
    check_ready_timeout,
)
from vsockrpc.vm.procs import exit_status, start_qemu
from vsockrpc.vm.qemu import VSOCK_CHARDEV, QemuConfig, find_qemu, qemu_argv
from vsockrpc.vm.qmpsession import Session, run_session
from vsockrpc.vm.ramfile import RamFill
from vsockrpc.vm.rundir import NameClaim
from vsockrpc.vm.snapshot import (
    FORMAT,
    IGNORE_SHARED,
    MANIFEST,
    RAM_FILES,
    STATE_FILE,
    device_add_args,
    file_sha256,
)
from vsockrpc.vm.startup import reap, state_record, take_slot, wait_qemu_up
from vsockrpc.vm.vsockdev import kernel_vhost_vsock_usable

__all__ = ["RestoredVm", "Snapshot", "load_snapshot", "restore", "restore_many"]

READY_TIMEOUT = 60.0
LOAD_TIMEOUT = 120.0
ANSWER_POLL = 0.05  # s between liveness checks while the agent's first call is pending


@dataclass(frozen=True, slots=True)
class Snapshot:
    path: Path
    manifest: dict[str, Any]
    image: ImageInfo

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def ram_file(self) -> Path | None:
        """The guest RAM beside the state (``ram.bin`` or ``ram.bin.zst``), if any."""
        name = next((n for n in RAM_FILES if n in self.manifest["files"]), None)
        return None if name is None else self.path / name

    @property
    def userspace_vsock(self) -> bool:
        """Saved with our userspace device unplugged (re-plugged in each clone), not with the
        kernel's vhost-vsock (whose state is in the snapshot)."""
        return bool(self.manifest["guest"]["vsock"] == "vhost-user-vsock-pci")


@dataclass
class RestoredVm(Vm):
    """A :class:`Vm` restored from a snapshot; ``restore_phases()`` instead of boot phases."""

    snapshot: Path | None = None
    marks: dict[str, float] = field(default_factory=dict)
    clock_offset: float | None = None  # guest - host clock before it was set (s)

    def __enter__(self) -> RestoredVm:
        return self

    def restore_phases(self) -> dict[str, float]:
        """Seconds per restore phase: start QEMU, load state, device re-plug, agent answers
        (the guest's probe of the device, then the first connection), fresh identity (when
        it was asked for)."""
        out: dict[str, float] = {}
        last = self.timings.launched
        names = (
            "start qemu",
            "load state",
            "device re-plug",
            "agent answers",
            "fresh identity",
        )
        for name in names:
            if name not in self.marks:
                break
            out[name] = self.marks[name] - last
            last = self.marks[name]
        return out


def load_snapshot(path: Path | str, *, verify: bool = True) -> Snapshot:
    """Validate a snapshot directory (:class:`VmError`, one line, when it is not usable).

    ``verify=False`` skips the sha256 of the state file (sizes are still checked): for a
    caller that verified this snapshot once already (a pool restoring it many times)."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not path.is_dir():
        raise VmError(f"snapshot {path}: no such directory")
    if not manifest_file.is_file():
        raise VmError(f"snapshot {path} is incomplete: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        image_path = Path(manifest["image"]["path"])
        digest = manifest["image"]["digest"]
        _ = (int(manifest["guest"]["memory_mib"]), str(manifest["qemu"]["version"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VmError(f"snapshot {path}: unreadable {MANIFEST}: {err!r}") from err
    if manifest.get("format") != FORMAT:
        raise VmError(f"snapshot {path}: format {manifest.get('format')!r}, expected {FORMAT}")
    if STATE_FILE not in files:
        raise VmError(f"snapshot {path}: {MANIFEST} lists no {STATE_FILE}")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise VmError(f"snapshot {path} is incomplete: {name} is missing")
        if file.stat().st_size != entry["size"]:
            raise VmError(
                f"snapshot {path} is corrupt: {name} has {file.stat().st_size} bytes, "
                f"manifest says {entry['size']}"
            )
        if verify and file_sha256(file) != entry["sha256"]:
            raise VmError(f"snapshot {path} is corrupt: {name} does not match its sha256")
    try:
        image = find_image(image_path)
    except ImageError as err:
        raise VmError(f"snapshot {path}: its image is gone: {err}") from err
    if file_sha256(image.path / "manifest.json") != digest:
        raise VmError(
            f"snapshot {path} was taken from another image (digest differs at {image_path})"
        )
    return Snapshot(path, manifest, image)


def restore(
    snapshot: Snapshot | Path | str,
    *,
    cid: int | None = None,
    name: str | None = None,
    ready_timeout: float = READY_TIMEOUT,
    echo: TextIO | None = None,
    detach: bool = False,
    cancel: threading.Event | None = None,
    verify: bool = True,
    fresh_identity: bool = True,
    groups: Sequence[str] = (),
) -> RestoredVm:
    """Start a new VM from ``snapshot``; returns once its agent answers (use it in ``with``).

    ``cid``: that CID or a :class:`VmError` when busy; None: the lowest free one.
    ``fresh_identity``: reseed its RNG, set its clock and hostname (:mod:`.identity`).
    ``groups``: VM↔VM, as for :func:`~vsockrpc.vm.launch` (the clone's agent keeps the
    snapshot's peer policy: it admits group members only if its source was started trusting
    them)."""
    return restore_many(
        snapshot,
        1,
        cid=cid,
        name=name,
        ready_timeout=ready_timeout,
        echo=echo,
        detach=detach,
        cancel=cancel,
        verify=verify,
        fresh_identity=fresh_identity,
        groups=groups,
    )[0]


def check_clone_groups(snap: Snapshot, groups: Sequence[str]) -> None:
    """:class:`VmError` if clones of ``snap`` cannot join ``groups``: a snapshot taken on kernel
    vhost-vsock carries that device's state, so its clones cannot move to our device."""
    if groups and not snap.userspace_vsock:
        raise VmError(
            f"snapshot {snap.path} uses kernel vhost-vsock, which cannot route between VMs: its "
            "clones cannot join a group"
        )


def restore_many(
    snapshot: Snapshot | Path | str,
    count: int,
    *,
    cid: int | None = None,
    name: str | None = None,
    ready_timeout: float = READY_TIMEOUT,
    echo: TextIO | None = None,
    detach: bool = False,
    cancel: threading.Event | None = None,
    verify: bool = True,
    fresh_identity: bool = True,
    groups: Sequence[str] = (),
) -> list[RestoredVm]:
    """``count`` clones of ``snapshot`` restored concurrently, each with its own CID (the
    lowest free ones; ``cid`` only with ``count`` 1) and name (``name-1``… when given).

    Processes are started on the calling thread (a foreground QEMU dies with the thread that
    started it: PDEATHSIG), then loaded and waited for in parallel. If any clone fails, all
    are stopped and the first error is raised."""
    if count < 1:
        raise InvalidVmOption(f"count must be at least 1, not {count}")
    if cid is not None:
        if count > 1:
            raise InvalidVmOption("a fixed CID cannot be given to more than one clone")
        check_cid(cid)
    names = [name] if count == 1 else [f"{name}-{i}" if name else None for i in range(1, count + 1)]
    for n in names:
        if n is not None:
            check_name(n)
    groups = check_groups(groups)
    check_ready_timeout(ready_timeout)
    snap = snapshot if isinstance(snapshot, Snapshot) else load_snapshot(snapshot, verify=verify)
    check_clone_groups(snap, groups)
    if not snap.userspace_vsock and not kernel_vhost_vsock_usable():
        raise VmError(
            f"snapshot {snap.path} uses kernel vhost-vsock: /dev/vhost-vsock is not usable"
        )
    qemu_bin = find_qemu(str(snap.image.manifest.get("arch", "amd64")))
    pending: list[_Pending] = []
    try:
        for n in names:
            pending.append(
                _start(snap, qemu_bin, cid=cid, name=n, echo=echo, detach=detach, groups=groups)
            )
        errors: list[BaseException] = []

        def finish(p: _Pending) -> None:
            try:
                _finish(p, snap, ready_timeout, cancel, fresh_identity)
            except BaseException as err:  # reported below, on the calling thread
                errors.append(err)

        if len(pending) == 1:
            finish(pending[0])
        else:
            threads = [threading.Thread(target=finish, args=(p,)) for p in pending]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        signals.check(cancel)
    except BaseException:
        for p in pending:
            p.stack.close()
        raise
    return [p.release() for p in pending]


@dataclass
class _Pending:
    """A clone whose processes run, not yet loaded: everything it holds in ``stack``."""

    vm: RestoredVm
    stack: ExitStack
    lease: cid_mod.CidLease
    claim: NameClaim
    detach: bool
    ram: RamFill

    def release(self) -> RestoredVm:
        if self.detach:  # the VM outlives us; `vm stop` cleans up
            self.stack.pop_all()
            if self.vm.device is not None:
                self.vm.device.release()
            self.vm.console.close()
            self.lease.close()  # QEMU and the device hold the locks through inherited fds
            self.claim.close()
        else:
            self.vm._stack = self.stack.pop_all()
        return self.vm


def _start(
    snap: Snapshot, qemu_bin: str, *, cid: int | None, name: str | None, echo: TextIO | None,
    detach: bool, groups: tuple[str, ...],
) -> _Pending:  # fmt: skip
    launched = time.monotonic()
    guest = snap.manifest["guest"]
    with ExitStack() as stack:
        slot = take_slot(stack, cid, name)
        lease, claim, held = slot.lease, slot.claim, slot.held
        run_dir = claim.run_dir
        device = None
        if snap.userspace_vsock:
            device = stack.enter_context(slot.device(detach=detach, groups=groups))
        ram = RamFill()
        if snap.ram_file is not None:  # copied, not loaded from the stream
            stack.callback(ram.close)
            size = int(guest["memory_mib"]) << 20
            ram.start_fill(snap.ram_file, size, f"vsockrpc-ram-{claim.name}")
        config = QemuConfig(
            qemu=qemu_bin,
            kernel=Path(guest["kernel"]),
            initrd=snap.image.initrd,
            rootfs=snap.image.rootfs,
            cmdline=guest["cmdline"],
            console_log=run_dir / "console.log",
            qmp_socket=run_dir / "qmp.sock",
            accel=guest["accel"],
            cpu=guest["cpu"],
            memory_mib=int(guest["memory_mib"]),
            cpus=int(guest["cpus"]),
            guest_cid=lease.cid,
            vhost_user_socket=device.vhost_socket if device else None,
            name=f"vsockrpc-{claim.name}",
            incoming="defer",
            ram_file=None if ram.fd is None else Path(f"/proc/self/fd/{ram.fd}"),
        )
        qemu_fds = held if ram.fd is None else (*held, ram.fd)
        qemu = start_qemu(qemu_argv(config), run_dir, qemu_fds, detach)
        stack.callback(reap, qemu)
        if device is not None:
            device.watch(qemu.pid)
        console = stack.enter_context(ConsoleFollower(run_dir / "console.log", echo=echo).start())
        accel = Accel(guest["accel"], guest["cpu"], "as in the snapshot")
        vm = RestoredVm(
            claim.name, lease.cid, int(guest["port"]), snap.image, run_dir, accel, qemu, console,
            device, groups, snapshot=snap.path,
        )  # fmt: skip
        vm.timings.launched = launched
        return _Pending(vm, stack.pop_all(), lease, claim, detach, ram)
    raise AssertionError("unreachable")


def _finish(
    p: _Pending,
    snap: Snapshot,
    ready_timeout: float,
    cancel: threading.Event | None,
    fresh_identity: bool,
) -> None:
    vm = p.vm
    wait_qemu_up(vm, cancel)
    vm.marks["start qemu"] = vm.timings.qemu_started = time.monotonic()
    run_session(vm.qmp_socket, lambda s: _load(s, snap, vm, p.ram), timeout=LOAD_TIMEOUT)
    p.ram.close()  # QEMU has mapped it
    state = state_record(vm, p.detach) | {"restored_from": str(snap.path)}
    (vm.run_dir / "state.json").write_text(json.dumps(state, indent=2))
    # The identity calls reuse the connection the wait made: a second connection costs a
    # loaded guest another handshake, and can be refused (the device gives the guest 2 s to
    # answer a connection request, as Linux does) where the first one succeeded.
    with rpc.channel(vm.address(), options=rpc.RETRY_OPTIONS) as channel:
        _wait_answer(vm, channel, ready_timeout, cancel)
        vm.marks["agent answers"] = vm.timings.rpc_ready = time.monotonic()
        if fresh_identity:
            vm.clock_offset = refresh_identity(channel, vm.name)
            vm.marks["fresh identity"] = time.monotonic()


async def _load(s: Session, snap: Snapshot, vm: RestoredVm, ram: RamFill) -> None:
    version = await s.run("query-version")
    q = version["qemu"]
    have = f"{q['major']}.{q['minor']}.{q['micro']}"
    want = snap.manifest["qemu"]
    if have != want["version"]:
        raise VmError(f"snapshot {snap.path} was taken with QEMU {want['version']}, this is {have}")
    machine = await s.run("qom-get", {"path": "/machine", "property": "type"})
    if machine != want["machine"]:
        raise VmError(
            f"snapshot {snap.path} was taken on machine type {want['machine']}, this is {machine}"
        )
    if snap.ram_file is not None:  # RAM is in place already: device state only
        await asyncio.to_thread(ram.wait_filled)
        await s.run("migrate-set-capabilities", IGNORE_SHARED)
    await s.run("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(snap.state_file))}"})
    await s.wait_migration(LOAD_TIMEOUT)
    vm.marks["load state"] = time.monotonic()
    if vm.device is not None:
        await s.run(
            "chardev-add",
            {
                "id": VSOCK_CHARDEV,
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": str(vm.device.vhost_socket)}},
                        "server": False,
                    },
                },
            },
        )
        await s.run("device_add", device_add_args())
    status = await s.run("query-status")
    if status.get("status") != "running":
        await s.run("cont")
    vm.marks["device re-plug"] = time.monotonic()


def _wait_answer(
    vm: RestoredVm, ch: grpc.Channel, timeout: float, cancel: threading.Event | None
) -> None:
    """Until the restored agent answers a ``System.Ping`` on ``ch``.

    One call for the whole wait (``wait_for_ready``: the channel's connection attempt — the
    vsock handshake through the re-plugged device, then HTTP/2's settings exchange — goes on
    with grpcio's reconnect backoff), polled every :data:`ANSWER_POLL` s while we check that
    QEMU and the device still run and that nobody cancelled. Right after a restore a TCG guest
    has an empty translation cache; with ten clones sharing two cores one handshake, and then
    one call, takes it seconds. Giving up on an attempt and starting another (a new channel
    every second, as before; or a call with a short deadline) abandons work the guest has
    nearly done and adds more: no clone answered. (No ``channel_ready_future`` either: its
    polling thread can outlive it and fail on the closed channel.)
    """
    system: Any = pb_grpc.SystemStub(ch)  # type: ignore[no-untyped-call]
    call = system.Ping.future(pb.PingRequest(), timeout=timeout, wait_for_ready=True)
    try:
        while True:
            signals.check(cancel)
            if not vm.running():
                raise VmError(
                    f"restored guest stopped (QEMU {exit_status(vm.qemu.returncode)}): "
                    f"{vm.qemu_log_tail() or 'no message'}"
                )
            if vm.device is not None:
                vm.device.check()
            try:
                call.result(timeout=ANSWER_POLL)
                return
            except grpc.FutureTimeoutError:
                continue
            except grpc.RpcError as err:
                last = getattr(ch, "last_error", None)  # a relayed channel's last dial error
                raise VmError(
                    f"restored guest's agent does not answer after {timeout:g} s: "
                    f"{last or err.details()}"
                ) from None
    finally:
        call.cancel()
