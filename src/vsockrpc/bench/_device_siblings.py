"""Two devices of one group, alone: guest ↔ guest through sibling routing (docs/device.md).

Two ``vsockrpc device`` child processes share a group; this process drives both guests with the
test driver (:mod:`vsockrpc.vhost.testing`), no QEMU. Guest A connects to guest B by CID: a
crc32-checked warm-up each way (untimed), then timed one-way streams A → B and 64-byte round
trips. Every timed stream must end exactly (every byte, then A's EOF) or no figure is produced.
Both guests share this one thread, so the figure includes the driver's own cost twice.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from vsockrpc.bench._device_alone import STALL_SECONDS, TransferFailed, bench_guest, device_process
from vsockrpc.bench._private import GuestDriver
from vsockrpc.vhost.packet import SHUTDOWN_SEND
from vsockrpc.vhost.testing import GuestStream, pump_all

CID_A, CID_B = 43, 44
GROUP = "bench"
MiB = 1 << 20


@contextlib.contextmanager
def _guests(workdir: Path) -> Iterator[tuple[GuestDriver, GuestDriver]]:
    groups = str(workdir / "groups")
    with contextlib.ExitStack() as stack:
        guests = []
        for cid in (CID_A, CID_B):
            vhost, uds = str(workdir / f"sib{cid}.vhost"), str(workdir / f"sib{cid}.vsock")
            stack.enter_context(
                device_process(
                    vhost, uds, cid=cid, extra=["--group", GROUP, "--groups-dir", groups]
                )
            )
            g = stack.enter_context(bench_guest(vhost, cid))
            g.boot()
            guests.append(g)
        yield guests[0], guests[1]


def _link(a: GuestDriver, b: GuestDriver, port: int) -> tuple[GuestStream, GuestStream]:
    listener = b.listen(port)
    sa = a.connect_start(port, cid=CID_B)
    deadline = time.monotonic() + 30
    while sa.state.value == "connecting" or not listener.backlog:
        if time.monotonic() > deadline or sa.reset:
            raise TransferFailed(f"guest↔guest: connect to CID {CID_B} port {port} failed")
        pump_all([a, b], 0.01)
    return sa, listener.backlog.popleft()


def _stream(a: GuestDriver, b: GuestDriver, port: int, total: int, *, check: bool) -> float:
    """A → B, ``total`` bytes; MB/s. ``check``: B crc32s what arrives."""
    sa, sb = _link(a, b, port)
    sb.discard = not check
    block = os.urandom(64 * 1024)
    chunk = memoryview(block)
    queued = 0
    digest = 0
    last, last_progress = 0, time.monotonic()
    t0 = time.perf_counter()
    while not sb.eof:
        while sa.unsent < 8 * MiB and queued < total:
            n = min(len(chunk), total - queued)
            sa.send(chunk[:n])
            queued += n
            if queued == total:
                sa.shutdown(SHUTDOWN_SEND)
        pump_all([a, b], 0.001)
        if check:
            digest = zlib.crc32(sb.recv(), digest)
        if sa.reset or sb.reset:
            raise TransferFailed(f"guest↔guest: stream reset at {sb.received} of {total}")
        if sb.received != last:
            last, last_progress = sb.received, time.monotonic()
        elif time.monotonic() - last_progress > STALL_SECONDS:
            raise TransferFailed(f"guest↔guest: no progress at {sb.received} of {total}")
    elapsed = time.perf_counter() - t0
    if sb.received != total:
        raise TransferFailed(f"guest↔guest: EOF after {sb.received} of {total} bytes")
    if check:
        expected = 0
        for off in range(0, total, len(block)):
            expected = zlib.crc32(chunk[: min(len(block), total - off)], expected)
        if digest != expected:
            raise TransferFailed("guest↔guest: checksum mismatch")
    sa.close()
    sb.close()
    b.listeners.pop(port, None)
    return total / elapsed / 1e6


def _rtt(a: GuestDriver, b: GuestDriver, port: int, pings: int) -> list[float]:
    sa, sb = _link(a, b, port)
    msg = b"p" * 64
    samples = []
    for _ in range(pings):
        t0 = time.perf_counter()
        sa.send(msg)
        while len(sb.rxbuf) < 64:
            pump_all([a, b], 0.001)
        sb.send(sb.recv(64))
        while len(sa.rxbuf) < 64:
            pump_all([a, b], 0.001)
        sa.recv(64)
        samples.append(time.perf_counter() - t0)
    sa.close()
    sb.close()
    return samples


def siblings_alone(
    workdir: Path, total: int, rounds: int, pings: int, step: Callable[[str], None]
) -> dict[str, list[float]]:
    """``{"MBps": [...], "rtt": [...]}``: ``rounds`` timed ``total``-byte streams guest A → guest
    B after a checked warm-up, and ``pings`` 64-byte round trips (seconds)."""
    out: dict[str, list[float]] = {"MBps": [], "rtt": []}
    with _guests(workdir) as (a, b):
        port = 9000
        _stream(a, b, port, min(total, 64 * MiB), check=True)
        for n in range(rounds):
            port += 1
            step(f"guest↔guest through two devices: {total // MiB} MiB, round {n + 1} of {rounds}")
            out["MBps"].append(_stream(a, b, port, total, check=False))
        out["rtt"] = _rtt(a, b, port + 1, pings)
    return out
