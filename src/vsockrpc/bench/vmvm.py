"""``vmvm`` part: guest ↔ guest through our vsock device (sibling routing) vs QEMU user networking.

Two TCG probe guests (the device tests' recipe: Debian cloud kernel, busybox, a static C probe),
A and B, served by one ``vsockrpc device`` process (both in one group, as ``vm run --group``
serves them: its group's device host), so guest B's connect to ``vsock:<CID of A>:PORT``
reaches A's listener, and each with a virtio-net NIC on QEMU user networking with a host port
forwarded to the probe's TCP listener. The two paths:

- ``user net``: what a user sets up without vsock: guest B connects to ``10.0.2.2:<host port
  forwarded to A>``: B's slirp → the host's loopback TCP → A's slirp port forward → A.
- ``vsock``: guest B connects to ``vsock:<CID of A>:PORT``: the device takes B's packet from B's
  tx ring and, in the same loop pass, puts it in A's rx ring (an in-process link, no socket).

The host only triggers the runs: it asks B's probe (over B's hybrid socket) to connect to A and
stream or echo (the probe's ``X`` command); B times them with ``CLOCK_MONOTONIC`` inside the
guest and answers the nanoseconds, so no host hop is in a figure. A crc32-checked transfer each
way per path (untimed) comes first; the timed rounds alternate the two paths (the order flips
every round) so drift from other load on the machine hits both alike.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from vsockrpc.bench import _model
from vsockrpc.bench._context import Context
from vsockrpc.bench._device_alone import MiB, cpu_seconds, group_device_process, hybrid_connect
from vsockrpc.bench._private import device_guest_recipe
from vsockrpc.bench.device import rtt_cpu_figure
from vsockrpc.errors import VsockRpcError

NAME = "vmvm"
TITLE = "guest ↔ guest: vsock sibling routing through the device vs QEMU user networking"
PATHS = ("user net (slirp port forward, TCP)", "vsock sibling (one device process)")
CID_A, CID_B = 43, 44
GROUP = "bench"
GATEWAY = 0x0A000202  # 10.0.2.2: the host as user networking shows it to a guest
REPLY_HEAD = struct.Struct("<iIII")  # status, crc_local, crc_peer, count
BOOT_TIMEOUT = 600.0  # two TCG guests booting at once on a loaded machine
OP_TIMEOUT = 300.0  # the longest one 'X' request may take

TARGET = (
    "Target: vsock at least 1.5 times user networking's throughput each way, and a round trip no "
    "longer than user networking's (ratios in the Summary: vsock ÷ user net)."
)
PATH = {
    "guests": "TCG, 1 vCPU each, q35; the probe guest of the device tests (KVM not used)",
    PATHS[0]: "guest B → B's QEMU user networking (slirp) → host loopback TCP → A's slirp "
    "port forward → guest A (virtio-net both ends)",
    PATHS[1]: "guest B → the group's userspace device process (vsockrpc device serving both "
    "VMs, vhost-user) → guest A (sibling routing through an in-process link)",
    "timing": "inside guest B (CLOCK_MONOTONIC), triggered by the host over B's hybrid socket",
}


@dataclass(frozen=True)
class Target:
    """Where guest B connects: family ``v`` (AF_VSOCK, ``addr`` a CID) or ``t`` (TCP, ``addr``
    an IPv4 address as an integer)."""

    family: bytes
    addr: int
    port: int

    def __str__(self) -> str:
        if self.family == b"v":
            return f"vsock:{self.addr}:{self.port}"
        return f"tcp:{socket.inet_ntoa(struct.pack('>I', self.addr))}:{self.port}"


@dataclass(frozen=True)
class Reply:
    status: int  # 0, an errno inside guest B, or -1: the peer ended the stream early
    crc_local: int
    crc_peer: int
    ns: list[int]


def request(target: Target, op: bytes, n: int) -> bytes:
    """The probe's ``X`` command: guest B connects to ``target`` and runs ``op`` (``s``/``S``:
    send ``n`` bytes, ``g``/``G``: receive ``n`` bytes, ``E``: ``n`` 64-byte round trips)."""
    return b"X" + struct.pack("<cIIcQ", target.family, target.addr, target.port, op, n)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_reply(s: socket.socket) -> Reply:
    status, crc_local, crc_peer, count = REPLY_HEAD.unpack(recv_exact(s, REPLY_HEAD.size))
    ns = list(struct.unpack(f"<{count}Q", recv_exact(s, 8 * count))) if count else []
    return Reply(status, crc_local, crc_peer, ns)


def _failure(status: int) -> str:
    return "the peer ended the stream early" if status < 0 else os.strerror(status)


def run_op(control: Callable[[], socket.socket], target: Target, op: bytes, n: int) -> list[int]:
    """Ask guest B (over ``control``) to run ``op`` against ``target``; its nanoseconds."""
    try:
        with control() as s:
            s.settimeout(OP_TIMEOUT)
            s.sendall(request(target, op, n))
            reply = read_reply(s)
    except (OSError, EOFError) as err:
        raise VsockRpcError(f"vmvm bench: guest B's probe did not answer {op!r}: {err}") from err
    what = f"guest B's {op.decode()} {n} to {target}"
    if reply.status:
        raise VsockRpcError(f"vmvm bench: {what} failed: {_failure(reply.status)}")
    if op in (b"S", b"G") and reply.crc_local != reply.crc_peer:
        raise VsockRpcError(f"vmvm bench: {what}: crc32 mismatch")
    if len(reply.ns) != (n if op == b"E" else 1):
        raise VsockRpcError(f"vmvm bench: {what}: {len(reply.ns)} timings in the reply")
    return reply.ns


def figures(
    b2a: dict[str, list[float]],
    a2b: dict[str, list[float]],
    rtt: dict[str, list[float]],
    size: int,
    cpu: dict[str, list[float]] | None = None,
) -> list[_model.Figure]:
    """MB/s per run each way and seconds per round trip, each keyed by :data:`PATHS` (the first,
    user networking, is the baseline of the ratios); ``cpu``: µs of CPU per round trip by
    process, one value per round."""
    mib = size // MiB
    out = [
        _model.figure(
            f"{NAME}.b2a", f"guest B → guest A stream, {mib} MiB", "rate", b2a, unit="MB/s"
        ),
        _model.figure(
            f"{NAME}.a2b", f"guest A → guest B stream, {mib} MiB", "rate", a2b, unit="MB/s"
        ),
        _model.figure(f"{NAME}.rtt", "guest B ↔ guest A 64-byte echo round trip", "latency", rtt),
    ]
    if cpu:
        out.append(rtt_cpu_figure(NAME, cpu, "each QEMU includes its guest's emulated work"))
    return out


def run(ctx: Context) -> _model.PartResult:
    if ctx.quick:
        return _model.skipped(NAME, TITLE, "--quick boots no guest (this part boots two)")
    recipe = device_guest_recipe()
    if recipe is None:
        return _model.skipped(NAME, TITLE, "it needs a source checkout (the tests/vm probe guest)")
    figures = _with_guests(ctx, recipe)
    path = PATH | {"guest kernel": recipe.kernel()[1].name}  # (vmlinuz, lib/modules/<version>)
    return _model.part_result(NAME, TITLE, path, figures, notes=[TARGET])


def _with_guests(ctx: Context, dg: ModuleType) -> list[_model.Figure]:
    size, pings, rounds = 64 * MiB, 2000, 5
    workdir: Path = ctx.workdir
    ctx.step(NAME, "building the probe guest (cloud kernel, busybox, static probe)")
    vmlinuz, initramfs = dg.build_initramfs(workdir)
    groups = workdir / "groups"
    groups.mkdir(mode=0o700)
    b2a: dict[str, list[float]] = {p: [] for p in PATHS}
    a2b: dict[str, list[float]] = {p: [] for p in PATHS}
    rtt: dict[str, list[float]] = {p: [] for p in PATHS}
    # CPU per round trip (µs), per round: where a round trip's time goes besides waiting.
    procs = ("QEMU A", "QEMU B", "device")  # user networking uses no device
    cpu: dict[str, list[float]] = {
        f"{p}: {who}": [] for p in PATHS for who in procs if "QEMU" in who or p == PATHS[1]
    }
    pids: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        ctx.step(NAME, f"booting guests A (CID {CID_A}) and B (CID {CID_B}) (TCG)")
        guests = []
        for name, cid in (("A", CID_A), ("B", CID_B)):
            sub = workdir / name.lower()
            sub.mkdir(mode=0o700)
            guests.append((str(sub / "vhost.sock"), str(sub / "vm.vsock"), cid))
        try:
            device = stack.enter_context(
                group_device_process(guests, group=GROUP, groups_dir=str(groups))
            )
        except RuntimeError as err:  # e.g. a device without --vm
            raise VsockRpcError(f"vmvm bench: the guests' vsock device: {err}") from err
        pids["device"] = device.pid
        vms = []
        for name, (vhost, _uds, _cid) in zip("AB", guests, strict=True):
            vms.append(
                stack.enter_context(dg.launch(vmlinuz, initramfs, vhost, workdir / name.lower()))
            )
            pids[f"QEMU {name}"] = vms[-1].proc.pid
        sockets = [uds for _vhost, uds, _cid in guests]
        for name, vm in zip("AB", vms, strict=True):
            try:
                vm.wait_console("PROBE-LISTEN tcp", BOOT_TIMEOUT)
                vm.wait_console("PROBE-LISTEN vsock", BOOT_TIMEOUT)
            except dg.GuestBootError as err:  # its text ends with the console's tail
                first = str(err).splitlines()[0]
                raise VsockRpcError(f"vmvm bench: guest {name} did not boot: {first}") from err
        uds_b = sockets[1]

        def control() -> socket.socket:
            return hybrid_connect(uds_b, dg.PROBE_PORT)

        targets = {
            PATHS[0]: Target(b"t", GATEWAY, vms[0].tcp_port),
            PATHS[1]: Target(b"v", CID_A, dg.PROBE_PORT),
        }
        ctx.step(NAME, "4 MiB each way per path, crc32-checked in the guests (untimed)")
        for target in targets.values():
            run_op(control, target, b"S", 4 * MiB)
            run_op(control, target, b"G", 4 * MiB)
            run_op(control, target, b"E", 100)
        for n in range(rounds):
            ctx.step(
                NAME,
                f"{size // MiB} MiB each way and {pings} round trips per path, "
                f"round {n + 1} of {rounds}",
            )
            for path in PATHS if n % 2 == 0 else PATHS[::-1]:
                target = targets[path]
                b2a[path].append(size / run_op(control, target, b"s", size)[0] * 1e3)
                a2b[path].append(size / run_op(control, target, b"g", size)[0] * 1e3)
                before = {who: cpu_seconds(pid) for who, pid in pids.items()}
                rtt[path] += [ns / 1e9 for ns in run_op(control, target, b"E", pings)]
                for who, pid in pids.items():
                    if f"{path}: {who}" in cpu:
                        used = cpu_seconds(pid) - before[who]
                        cpu[f"{path}: {who}"].append(used / pings * 1e6)
    return figures(b2a, a2b, rtt, size, cpu)
