#!/usr/bin/env python3
"""The userspace vsock device: throughput and latency against QEMU user networking, same guest.

One TCG guest (tests/vm/_device_guest.py: Debian cloud kernel + guest_probe) has both our
vhost-user-vsock device (run as ``vsockrpc device`` in a child process, as vm/ does) and a
virtio-net NIC on QEMU user networking with a host port forwarded to the same probe. In the same
run it measures, for each path:

* host → guest throughput (``S``: the guest checksums what arrives; verified with crc32),
* guest → host throughput (``G``: the guest sends data and its crc32; verified),
* 64-byte round-trip time (``E``: echo), p50 and p99 over --pings round trips,

and the back-end alone, driven by the test driver (vsockrpc.vhost.testing) as the guest with no
QEMU: MB/s and packets/s each way. Rounds alternate between the two paths so drift hits both.

    .venv/bin/python bench/bench_device.py [--size-mib 64] [--pings 2000] [--alone-mib 2048]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests/vm/_device_guest.py (the shared guest recipe)

from tests.vm import _device_guest as dg  # noqa: E402

from vsockrpc.addresses import HybridAddress  # noqa: E402
from vsockrpc.transport import hybrid  # noqa: E402
from vsockrpc.vhost.testing import GuestDriver, RxLayout  # noqa: E402

GUEST_CID = 42
MiB = 1 << 20


# ----------------------------------------------------------------------------- helpers
@contextmanager
def device_process(vhost: str, uds: str) -> Iterator[subprocess.Popen[bytes]]:
    profile = os.environ.get("BENCH_DEVICE_PYSPY")  # e.g. /tmp/dev.txt: py-spy collapsed stacks
    wrap = ["py-spy", "record", "--format", "raw", "-o", profile, "--"] if profile else []
    proc = subprocess.Popen(
        [
            *wrap,
            sys.executable,
            "-m",
            "vsockrpc.cli.main",
            "device",
            "--socket",
            vhost,
            "--uds",
            uds,
            "--cid",
            str(GUEST_CID),
        ],
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(uds):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("device did not start")
            time.sleep(0.01)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT if profile else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def hybrid_connect(uds: str, port: int) -> socket.socket:
    """The project's hybrid client (``CONNECT``/``OK``), with a 60 s bound on every later call."""
    s = hybrid.connect(HybridAddress(uds, port), timeout=60)
    s.settimeout(60)
    return s


def tcp_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def h2g(connect: Callable[[], socket.socket], data: bytes, *, check: bool = False) -> float:
    """Host → guest MB/s. ``check``: the guest crc32s the data (slow under TCG: the warm-up
    verifies integrity, the timed runs measure the transport with the guest just counting)."""
    with connect() as s:
        t0 = time.perf_counter()
        s.sendall((b"S" if check else b"s") + struct.pack("<Q", len(data)) + data)
        (crc,) = struct.unpack("<I", recv_exact(s, 4))
        elapsed = time.perf_counter() - t0
    if check and crc != zlib.crc32(data):
        raise RuntimeError("host→guest checksum mismatch")
    return len(data) / elapsed / 1e6


def g2h(connect: Callable[[], socket.socket], size: int, *, check: bool = False) -> float:
    with connect() as s:
        t0 = time.perf_counter()
        s.sendall(b"G" + struct.pack("<QI", size, 7) if check else b"g" + struct.pack("<Q", size))
        data = recv_exact(s, size)
        elapsed = time.perf_counter() - t0
        (crc,) = struct.unpack("<I", recv_exact(s, 4))
    if check and crc != zlib.crc32(data):
        raise RuntimeError("guest→host checksum mismatch")
    return size / elapsed / 1e6


def rtt(connect: Callable[[], socket.socket], pings: int) -> tuple[float, float]:
    msg = b"p" * 64
    samples = []
    with connect() as s:
        s.sendall(b"E")
        for i in range(pings):
            t0 = time.perf_counter()
            s.sendall(msg)
            try:
                recv_exact(s, 64)
            except TimeoutError as err:
                raise TimeoutError(f"no echo for ping {i} of {pings}") from err
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 when it cannot be read, e.g. under py-spy)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- backend alone
STALL_SECONDS = 30.0  # no progress for this long: the transfer failed


class TransferFailed(RuntimeError):
    """A backend-alone transfer did not complete exactly: no figure is printed for it."""


def _host_sender(uds: str, port: int, block: bytes, total: int) -> None:
    """Send ``total`` bytes (``block`` repeated), then wait for the guest's close. Exit status 0
    only if everything was written and the stream then ended cleanly."""
    s = hybrid_connect(uds, port)
    sent = 0
    while sent < total:
        n = min(len(block), total - sent)
        s.sendall(block[:n])  # BrokenPipeError / ConnectionResetError: exit status 1
        sent += n
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()


def _host_sink(uds: str, port: int, total: int, got: Any, crc: Any) -> None:
    """Accept the guest's connection; record the bytes received (and their crc32 if ``crc``
    is given: ``crc.value`` is -1 for "do not check")."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(f"{uds}_{port}")
    srv.listen()
    peer, _ = srv.accept()
    peer.settimeout(STALL_SECONDS)
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    n = 0
    digest = 0
    check = crc.value != -1
    while True:
        r = peer.recv_into(buf)
        if not r:
            break
        if check:
            digest = zlib.crc32(view[:r], digest)
        n += r
        got.value = n
    if check:
        crc.value = digest
    peer.close()
    srv.close()


def _repeated_crc(block: bytes, total: int) -> int:
    crc = 0
    for off in range(0, total, len(block)):
        crc = zlib.crc32(memoryview(block)[: min(len(block), total - off)], crc)
    return crc


def _h2g_alone(g: GuestDriver, uds: str, port: int, total: int, *, check: bool) -> dict[str, float]:
    """Host → guest through the device alone. ``check``: the driver crc32s what arrives
    (untimed integrity run); otherwise it just counts, and the transfer must still end exactly:
    every byte, then the host's EOF (SHUTDOWN), no RST, the sender exiting 0."""
    ctx = multiprocessing.get_context("fork")
    block = os.urandom(4 * MiB)
    listener = g.listen(port)
    sender = ctx.Process(target=_host_sender, args=(uds, port, block, total))
    sender.start()
    try:
        stream = g.accept(listener, 10)
        stream.discard = not check
        digest = 0
        packets = 0
        got = 0
        t0 = time.perf_counter()
        last_progress = time.monotonic()
        while True:
            packets += g.pump(0.01)
            if check:
                data = stream.recv()
                digest = zlib.crc32(data, digest)
            now_got = stream.received
            if now_got != got:
                got, last_progress = now_got, time.monotonic()
            if got > total:
                raise TransferFailed(f"host→guest: guest counted {got} bytes of {total} sent")
            if stream.reset:
                raise TransferFailed(f"host→guest: stream reset by the device after {got} bytes")
            if stream.eof:
                break  # the host's EOF arrived: everything it sent is in
            if sender.exitcode not in (None, 0):
                raise TransferFailed(
                    f"host→guest: sender died (exit {sender.exitcode}) after the guest got "
                    f"{got} of {total} bytes"
                )
            if time.monotonic() - last_progress > STALL_SECONDS:
                raise TransferFailed(f"host→guest: no progress for {STALL_SECONDS:.0f} s at {got}")
        elapsed = time.perf_counter() - t0
        if got != total:
            raise TransferFailed(f"host→guest: EOF after {got} of {total} bytes")
        if check and digest != _repeated_crc(block, total):
            raise TransferFailed("host→guest: checksum mismatch")
        stream.close()
        g.wait_for(lambda: not sender.is_alive() or stream.reset, 10, "host close")
        sender.join(10)
        if sender.exitcode != 0:
            raise TransferFailed(f"host→guest: sender exited {sender.exitcode}")
        return {"MBps": total / elapsed / 1e6, "pps": packets / elapsed, "elapsed": elapsed}
    finally:
        if sender.is_alive():
            sender.kill()
        sender.join()
        g.listeners.pop(port, None)


def _g2h_alone(g: GuestDriver, uds: str, port: int, total: int, *, check: bool) -> dict[str, float]:
    """Guest → host through the device alone; the sink must receive exactly ``total`` bytes
    (crc32-checked when ``check``)."""
    ctx = multiprocessing.get_context("fork")
    got = ctx.Value("q", 0)
    crc = ctx.Value("q", 0 if check else -1)
    sink = ctx.Process(target=_host_sink, args=(uds, port, total, got, crc))
    sink.start()
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{uds}_{port}") and time.monotonic() < deadline:
            time.sleep(0.01)
        stream = g.connect(port)
        block = os.urandom(64 * 1024)
        chunk = memoryview(block)
        queued = 0
        t0 = time.perf_counter()
        packets = 0
        last, last_progress = 0, time.monotonic()
        while stream.unsent or queued < total:
            while stream.unsent < 8 * MiB and queued < total:
                n = min(len(chunk), total - queued)
                stream.send(chunk[:n])
                queued += n
            before = stream.tx_cnt
            g.pump(0.001)
            packets += -(-((stream.tx_cnt - before) & 0xFFFFFFFF) // len(chunk))
            if stream.reset or stream.eof:
                raise TransferFailed(f"guest→host: stream ended by the device at {got.value}")
            if not sink.is_alive():
                raise TransferFailed(f"guest→host: sink gone after {got.value} of {total}")
            if got.value != last:
                last, last_progress = got.value, time.monotonic()
            elif time.monotonic() - last_progress > STALL_SECONDS:
                raise TransferFailed(f"guest→host: no progress at {got.value} of {total}")
        stream.close()  # everything is queued: SHUTDOWN, the sink sees EOF after the last byte
        while sink.is_alive():
            g.pump(0.001)
            sink.join(0.001)
            if time.monotonic() - last_progress > STALL_SECONDS:
                raise TransferFailed(f"guest→host: sink stalled at {got.value} of {total}")
            if got.value != last:
                last, last_progress = got.value, time.monotonic()
        elapsed = time.perf_counter() - t0
        if sink.exitcode != 0 or got.value != total:
            raise TransferFailed(
                f"guest→host: sink got {got.value} of {total} bytes (exit {sink.exitcode})"
            )
        if check and crc.value != _repeated_crc(block, total):
            raise TransferFailed("guest→host: checksum mismatch")
        return {"MBps": total / elapsed / 1e6, "pps": packets / elapsed, "elapsed": elapsed}
    finally:
        if sink.is_alive():
            sink.kill()
        sink.join()


def backend_alone(workdir: Path, total: int) -> dict[str, float]:
    """Each direction: a crc32-checked 64 MiB run (untimed), then the timed ``total`` run,
    which must also end exactly (see _h2g_alone / _g2h_alone) or no figure is printed."""
    vhost, uds = str(workdir / "alone.vhost"), str(workdir / "alone.vsock")
    out: dict[str, float] = {}
    with (
        device_process(vhost, uds) as dev,
        GuestDriver(
            vhost,
            guest_cid=GUEST_CID,
            rx_buf_size=44 + 65536,
            rx_layout=RxLayout.SINGLE,
            mem_size=256 * MiB,
            buf_alloc=4 * MiB,
        ) as g,
    ):
        g.boot()
        port = 9000
        for key, run in (("h2g", _h2g_alone), ("g2h", _g2h_alone)):
            run(g, uds, port, min(total, 64 * MiB), check=True)
            cpu0 = cpu_seconds(dev.pid)
            r = run(g, uds, port + 1, total, check=False)
            cpu = cpu_seconds(dev.pid) - cpu0
            out[f"{key}_MBps"] = r["MBps"]
            out[f"{key}_pps"] = r["pps"]
            out[f"{key}_cpu"] = total / max(cpu, 1e-9) / 1e6
            port += 2
    return out


# ----------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64, help="bytes per throughput run")
    parser.add_argument("--pings", type=int, default=2000, help="64-byte round trips per path")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure")
    parser.add_argument("--alone-mib", type=int, default=2048, help="bytes for backend alone")
    parser.add_argument("--skip-vm", action="store_true", help="backend-alone figures only")
    parser.add_argument("--smp", type=int, default=1, help="guest vCPUs (TCG threads)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bdev", dir="/tmp"))
    try:
        try:
            alone = backend_alone(workdir, args.alone_mib * MiB)
        except TransferFailed as err:
            print(f"backend alone: transfer failed, no figure: {err}", file=sys.stderr)
            return 1
        results: dict[str, dict[str, list[float]]] = {"device": {}, "usernet": {}}
        if not args.skip_vm:
            vmlinuz, initramfs = dg.build_initramfs(workdir)
            vhost, uds = str(workdir / "vhost.sock"), str(workdir / "vm.vsock")
            with (
                device_process(vhost, uds) as dev,
                dg.launch(vmlinuz, initramfs, vhost, workdir, smp=args.smp) as vm,
            ):
                pids = {"dev": dev.pid, "qemu": vm.proc.pid}
                vm.wait_console("PROBE-LISTEN tcp", 120)
                vm.wait_console("PROBE-LISTEN vsock", 120)

                def record(
                    r: dict[str, list[float]], key: str, fn: Callable[[], dict[str, float]]
                ) -> None:
                    """Run fn; keep its figures and each process's CPU share meanwhile."""
                    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                    t0 = time.perf_counter()
                    for name, value in fn().items():
                        r.setdefault(name, []).append(value)
                    wall = time.perf_counter() - t0
                    for k, p in pids.items():
                        util = 100 * (cpu_seconds(p) - cpu0[k]) / wall
                        r.setdefault(f"{key}_{k}", []).append(util)

                paths: dict[str, Callable[[], socket.socket]] = {
                    "device": lambda: hybrid_connect(uds, dg.PROBE_PORT),
                    "usernet": lambda: tcp_connect(vm.tcp_port),
                }
                data = os.urandom(args.size_mib * MiB)
                size = len(data)
                for connect in paths.values():  # warm-up, checksummed both ways
                    h2g(connect, data[: 4 * MiB], check=True)
                    g2h(connect, 4 * MiB, check=True)
                    rtt(connect, 100)

                def pings(c: Callable[[], socket.socket]) -> dict[str, float]:
                    p50, p99 = rtt(c, args.pings)
                    return {"p50": p50, "p99": p99}

                def to_guest(c: Callable[[], socket.socket]) -> dict[str, float]:
                    return {"h2g": h2g(c, data)}

                def to_host(c: Callable[[], socket.socket]) -> dict[str, float]:
                    return {"g2h": g2h(c, size)}

                for n in range(args.rounds):
                    for path, connect in paths.items():
                        r = results[path]
                        print(f"round {n + 1}: {path}", file=sys.stderr, flush=True)
                        record(r, "h2g", functools.partial(to_guest, connect))
                        record(r, "g2h", functools.partial(to_host, connect))
                        record(r, "p50", functools.partial(pings, connect))
        print()
        print(f"backend alone (test driver as guest, no QEMU), {args.alone_mib} MiB each way:")
        for way, key in (("host→guest", "h2g"), ("guest→host", "g2h")):
            print(
                f"  {way} {alone[key + '_MBps']:8.0f} MB/s  {alone[key + '_pps']:9.0f} packets/s"
                f"   (device: {alone[key + '_cpu']:6.0f} MB per CPU-second)"
            )
        if not args.skip_vm:
            med = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in results.items()}
            d, u = med["device"], med["usernet"]
            print()
            print(
                f"QEMU TCG guest ({args.smp} vCPU), {args.size_mib} MiB per run, "
                f"median of {args.rounds} rounds, "
                f"RTT over {args.pings} pings:"
            )
            print(f"  {'':24} {'vsock device':>14} {'user net (TCP)':>15} {'ratio':>7}  target")
            print(
                f"  {'host→guest MB/s':24} {d['h2g']:14.1f} {u['h2g']:15.1f} "
                f"{d['h2g'] / u['h2g']:7.2f}  ≥ 1.5"
            )
            print(
                f"  {'guest→host MB/s':24} {d['g2h']:14.1f} {u['g2h']:15.1f} "
                f"{d['g2h'] / u['g2h']:7.2f}  ≥ 1.5"
            )
            print(
                f"  {'64 B RTT p50 µs':24} {d['p50']:14.0f} {u['p50']:15.0f} "
                f"{d['p50'] / u['p50']:7.2f}  ≤ 1.0"
            )
            print(
                f"  {'64 B RTT p99 µs':24} {d['p99']:14.0f} {u['p99']:15.0f} "
                f"{d['p99'] / u['p99']:7.2f}"
            )
            print("  CPU use meanwhile (100% = one core): device process / QEMU process")
            for key, label in (("h2g", "host→guest"), ("g2h", "guest→host"), ("p50", "RTT")):
                print(
                    f"  {label:24} {d[key + '_dev']:6.0f}% /{d[key + '_qemu']:4.0f}%"
                    f"   user net: QEMU {u[key + '_qemu']:4.0f}%"
                )
        print(f"  backend alone host→guest target ≥ 1000 MB/s: {alone['h2g_MBps']:.0f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
