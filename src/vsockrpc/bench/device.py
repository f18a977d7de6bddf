"""``device`` part: the userspace vsock device against QEMU user networking, and alone.

Guest half (not in ``--quick``; needs a source checkout for the probe guest recipe of the device
tests): one TCG guest (Debian cloud kernel + a static C probe) has both our vhost-user-vsock
device (``vsockrpc device`` in a child process, as vm/ runs it) and a virtio-net NIC on QEMU user
networking with a host port forwarded to the same probe. Rounds alternate between the two paths:
host→guest and guest→host streams, 64-byte round trips, and host→guest throughput against the
size of each write, 64 B to 1 MiB. Alone half: :mod:`vsockrpc.bench._device_alone`.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from vsockrpc.bench import _cpp, _model
from vsockrpc.bench._context import Context
from vsockrpc.bench._device_alone import (
    MiB,
    TransferFailed,
    backend_alone,
    cpu_seconds,
    device_process,
    hybrid_connect,
)
from vsockrpc.bench._device_siblings import ONE as SIB_ONE
from vsockrpc.bench._device_siblings import TWO as SIB_TWO
from vsockrpc.bench._device_siblings import siblings_alone
from vsockrpc.bench._private import device_guest_recipe
from vsockrpc.errors import VsockRpcError

NAME = "device"
TITLE = "the userspace vsock device vs QEMU user networking, and the device alone"
SWEEP = [64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]
PATHS = ("user net (virtio-net, TCP)", "vsock device")
#: The round trip's reference lines: hand-offs between two processes, and nothing else, with the
#: processes on two cores and on one.
HANDOFFS = "two processes waking each other (C++)"
HANDOFFS_TWO = "two processes waking each other, two cores (C++)"
HANDOFFS_ONE = "two processes waking each other, one core (C++)"

Connect = Callable[[], socket.socket]


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = s.recv_into(view[got:], min(n - got, 4 * MiB))
        if not r:
            raise EOFError(f"EOF after {got} of {n} bytes")
        got += r
    return bytes(buf)


def h2g(connect: Connect, data: bytes, *, write: int = 4 * MiB, check: bool = False) -> float:
    """Host → guest MB/s, ``write`` bytes per send. ``check``: the guest crc32s the data (slow
    under TCG: the warm-up verifies integrity, timed runs measure the transport)."""
    view = memoryview(data)
    with connect() as s:
        t0 = time.perf_counter()
        s.sendall((b"S" if check else b"s") + struct.pack("<Q", len(data)))
        for off in range(0, len(data), write):
            s.sendall(view[off : off + write])
        (crc,) = struct.unpack("<I", recv_exact(s, 4))
        elapsed = time.perf_counter() - t0
    if check and crc != zlib.crc32(data):
        raise VsockRpcError("device bench: host→guest checksum mismatch")
    return len(data) / elapsed / 1e6


def g2h(connect: Connect, size: int, *, check: bool = False) -> float:
    with connect() as s:
        t0 = time.perf_counter()
        s.sendall(b"G" + struct.pack("<QI", size, 7) if check else b"g" + struct.pack("<Q", size))
        data = recv_exact(s, size)
        elapsed = time.perf_counter() - t0
        (crc,) = struct.unpack("<I", recv_exact(s, 4))
    if check and crc != zlib.crc32(data):
        raise VsockRpcError("device bench: guest→host checksum mismatch")
    return size / elapsed / 1e6


def rtt(connect: Connect, pings: int) -> list[float]:
    """Seconds per 64-byte echo round trip."""
    msg = b"p" * 64
    samples = []
    with connect() as s:
        s.sendall(b"E")
        for _ in range(pings):
            t0 = time.perf_counter()
            s.sendall(msg)
            recv_exact(s, 64)
            samples.append(time.perf_counter() - t0)
    return samples


def handoffs(exe: Path, count: int, cpus: tuple[int, int] | None = None) -> list[float]:
    """Seconds per round trip of ``cpp/handoffs.cc``: two processes waking each other through
    eventfds (two hand-offs), as the guest's kick wakes the device and its call wakes QEMU.
    ``cpus``: the CPU of each process (the same one twice: both on one core)."""
    argv = [str(exe), str(count), *(str(cpu) for cpu in cpus or ())]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as err:
        raise VsockRpcError("device bench: the C++ hand-offs did not finish in 300 s") from err
    samples = [int(line) / 1e9 for line in done.stdout.split()]
    if done.returncode != 0 or len(samples) != count:
        why = " ".join(done.stderr.split()) or f"{len(samples)} of {count} round trips"
        raise VsockRpcError(f"device bench: the C++ hand-offs failed: {why}")
    return samples


def handoff_placements() -> dict[str, tuple[int, int]]:
    """The hand-off lines to measure: on two cores (if this process may use two) and on one."""
    cpus = sorted(os.sched_getaffinity(0))
    placements = {HANDOFFS_TWO: (cpus[0], cpus[1])} if len(cpus) > 1 else {}
    return placements | {HANDOFFS_ONE: (cpus[0], cpus[0])}


def tcp_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def run(ctx: Context) -> _model.PartResult:
    alone_mib, alone_rounds = (64, 2) if ctx.quick else (2048, 3)
    figures, notes = [], []
    try:
        alone = backend_alone(
            ctx.workdir, alone_mib * MiB, alone_rounds, lambda line: ctx.step(NAME, line)
        )
    except TransferFailed as err:
        raise VsockRpcError(f"device bench: backend-alone transfer failed: {err}") from err
    figures.append(
        _model.figure(
            f"{NAME}.alone",
            f"device alone (test driver as guest, no QEMU), {alone_mib} MiB per run",
            "rate",
            {"host→guest": alone["h2g_MBps"], "guest→host": alone["g2h_MBps"]},
            unit="MB/s",
            pairs=[],
        )
    )
    cores = len(os.sched_getaffinity(0))
    bound = f"CPU bound, {cores} cores"
    for key, direction in (("h2g", "host→guest"), ("g2h", "guest→host")):
        if alone.get(f"{key}_bound"):
            figures.append(
                _model.figure(
                    f"{NAME}.alone-bound-{key}",
                    f"device alone, {direction}: measured vs what the CPU allows",
                    "rate",
                    {bound: alone[f"{key}_bound"], "measured": alone[f"{key}_MBps"]},
                    unit="MB/s",
                    baseline=bound,
                    pairs=[["measured", bound]],
                    note=f"{bound}: the rate that the CPU time of the three processes moving "
                    "the bytes (device, test driver, host peer: next figure) allows on this "
                    f"machine's {cores} cores, no process above one core. A run near it is "
                    "bound by the machine, not by any one of them.",
                )
            )
    if alone.get("h2g_cpu") and alone.get("g2h_cpu"):
        per_process = {}
        for key, direction, peer in (
            ("h2g", "host→guest", "sender"),
            ("g2h", "guest→host", "sink"),
        ):
            per_process[f"{direction}: device"] = alone[f"{key}_cpu"]
            per_process[f"{direction}: test driver (guest)"] = alone[f"{key}_cpu_guest"]
            per_process[f"{direction}: host {peer}"] = alone[f"{key}_cpu_host"]
        figures.append(
            _model.figure(
                f"{NAME}.alone-cpu",
                "device alone: MB moved per CPU-second, by process",
                "rate",
                per_process,
                unit="MB/CPU-s",
                pairs=[],
                note="The device's figure is what the back-end could move with a whole core to "
                "itself. Device: utime + stime from /proc (10 ms ticks); test driver: the "
                "CPU time of the bench thread that runs it; host peer: its own process times.",
            )
        )
    sib_mib, sib_rounds, sib_pings = (16, 1, 200) if ctx.quick else (512, 3, 2000)
    try:
        sib = siblings_alone(
            ctx.workdir, sib_mib * MiB, sib_rounds, sib_pings, lambda line: ctx.step(NAME, line)
        )
    except TransferFailed as err:
        raise VsockRpcError(f"device bench: guest↔guest transfer failed: {err}") from err
    figures.append(
        _model.figure(
            f"{NAME}.alone-siblings",
            f"a group's devices alone: guest A → guest B by CID, {sib_mib} MiB per run",
            "rate",
            {SIB_ONE: sib["MBps"][SIB_ONE], SIB_TWO: sib["MBps"][SIB_TWO]},
            unit="MB/s",
            pairs=[(SIB_ONE, SIB_TWO)],
        )
    )
    figures.append(
        _model.figure(
            f"{NAME}.alone-siblings-rtt",
            "a group's devices alone: 64-byte guest↔guest round trip",
            "latency",
            {SIB_ONE: sib["rtt"][SIB_ONE], SIB_TWO: sib["rtt"][SIB_TWO]},
            pairs=[(SIB_ONE, SIB_TWO)],
        )
    )
    path = {
        "device alone": "userspace device, driven by the test driver (no QEMU, no guest)",
        "guest↔guest alone": f"{SIB_ONE}: both guests of the group served by one process "
        f"(in-process link, as vm run --group); {SIB_TWO}: one each, linked by the group's "
        "Unix socket; both guests played by the test driver in one thread (no QEMU)",
    }
    recipe = device_guest_recipe()
    if ctx.quick:
        notes.append("--quick: the guest half (a TCG boot) was not run")
    elif recipe is None:
        notes.append("guest half skipped: it needs a source checkout (tests/vm probe guest)")
    else:
        handoffs_exe = _cpp.optional_reference(
            _cpp.build_handoffs, HANDOFFS, lambda line: ctx.step(NAME, line), notes
        )
        figures += _with_guest(ctx, recipe, handoffs_exe)
        path |= {
            "guest": "TCG, 1 vCPU, q35 (KVM not used: see the machine table)",
            "guest kernel": recipe.kernel()[1].name,  # (vmlinuz, lib/modules/<version>)
            "vsock device": "userspace (vsockrpc device over vhost-user), hybrid socket",
            "user net": "QEMU user networking (slirp), virtio-net, TCP port forward",
        }
    return _model.part_result(NAME, TITLE, path, figures, notes=notes)


def rtt_cpu_figure(part: str, cpu: dict[str, list[float]], qemu: str) -> _model.Figure:
    """µs of CPU per 64-byte round trip by process, one value per round; ``qemu``: what a
    QEMU process's figure includes."""
    return _model.figure(
        f"{part}.rtt-cpu",
        "CPU per 64-byte round trip, by process",
        "time",
        cpu,
        unit="µs",
        pairs=[],
        note="One value per round: utime + stime from /proc over its round trips (10 ms "
        f"ticks); {qemu}, and user networking's slirp.",
    )


def _with_guest(ctx: Context, dg: ModuleType, handoffs_exe: Path | None) -> list[_model.Figure]:
    size, pings, rounds, sweep_rounds = 64 * MiB, 2000, 3, 2
    workdir: Path = ctx.workdir
    ctx.step(NAME, "building the probe guest (cloud kernel, busybox, static probe)")
    vmlinuz, initramfs = dg.build_initramfs(workdir)
    vhost, uds = str(workdir / "vhost.sock"), str(workdir / "vm.vsock")
    up: dict[str, list[float]] = {p: [] for p in PATHS}
    down: dict[str, list[float]] = {p: [] for p in PATHS}
    lat: dict[str, list[float]] = {p: [] for p in PATHS}
    placements = handoff_placements() if handoffs_exe is not None else {}
    for name in placements:
        lat[name] = []
    sweep: dict[str, list[list[float]]] = {p: [[] for _ in SWEEP] for p in PATHS}
    # CPU per round trip (µs), per round: where a round trip's time goes besides waiting.
    cpu: dict[str, list[float]] = {f"{p}: {who}": [] for p in PATHS for who in ("QEMU", "device")}
    cpu.pop(f"{PATHS[0]}: device")  # user networking has no device process
    with (
        device_process(vhost, uds) as device,
        dg.launch(vmlinuz, initramfs, vhost, workdir) as vm,
    ):
        ctx.step(NAME, "booting the probe guest (TCG)")
        vm.wait_console("PROBE-LISTEN tcp", 300)
        vm.wait_console("PROBE-LISTEN vsock", 300)
        paths: dict[str, Connect] = {
            PATHS[0]: lambda: tcp_connect(vm.tcp_port),
            PATHS[1]: lambda: hybrid_connect(uds, dg.PROBE_PORT),
        }
        data = os.urandom(size)
        for connect in paths.values():  # warm-up, checksummed both ways
            h2g(connect, data[: 4 * MiB], check=True)
            g2h(connect, 4 * MiB, check=True)
            rtt(connect, 100)
        for n in range(rounds):
            ctx.step(NAME, f"streams and {pings} round trips per path, round {n + 1} of {rounds}")
            for name, connect in paths.items():
                up[name].append(h2g(connect, data))
                down[name].append(g2h(connect, size))
                before = {"QEMU": cpu_seconds(vm.proc.pid), "device": cpu_seconds(device.pid)}
                lat[name] += rtt(connect, pings)
                for who, pid in (("QEMU", vm.proc.pid), ("device", device.pid)):
                    if f"{name}: {who}" in cpu:
                        used = cpu_seconds(pid) - before[who]
                        cpu[f"{name}: {who}"].append(used / pings * 1e6)
            for name, cpus in placements.items():
                assert handoffs_exe is not None
                lat[name] += handoffs(handoffs_exe, pings, cpus)
        for n in range(sweep_rounds):
            ctx.step(NAME, f"host→guest vs write size 64 B…1 MiB, round {n + 1} of {sweep_rounds}")
            for i, write in enumerate(SWEEP):
                total = min(max(write * 1024, MiB), 16 * MiB)
                for name, connect in paths.items():
                    sweep[name][i].append(h2g(connect, data[:total], write=write))
    return [
        _model.figure(f"{NAME}.h2g", "host→guest stream, 64 MiB", "rate", up, unit="MB/s"),
        _model.figure(f"{NAME}.g2h", "guest→host stream, 64 MiB", "rate", down, unit="MB/s"),
        _model.figure(
            f"{NAME}.rtt",
            "64-byte echo round trip",
            "latency",
            lat,
            note=f"{HANDOFFS}, pinned to two cores or to one: a round trip of two hand-offs "
            "through eventfds and epoll_wait, nothing else (cpp/handoffs.cc); one hand-off "
            "costs half of it. The device path has one more than user "
            "networking's, in any language: the host's bytes wake the device, which wakes QEMU, "
            "where they wake QEMU directly (the guest's kick wakes the device in place of "
            "QEMU's main loop). The device and QEMU are not pinned: either cost may apply.",
        ),
        rtt_cpu_figure(NAME, cpu, "QEMU includes the guest's emulated work"),
        _model.figure(
            f"{NAME}.sweep",
            "host→guest throughput vs size of each write",
            "sweep",
            sweep,
            x=SWEEP,
            unit="MB/s",
            note="The guest reads in 64 KiB; total per point: 1024 writes, 1-16 MiB.",
        ),
    ]
