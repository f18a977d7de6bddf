"""Devices of one group, alone: guest ↔ guest through sibling routing (docs/device.md).

Two pairs of guests, each pair in a group of its own: one pair served by one ``vsockrpc
device`` process (``--vm`` twice: an in-process link between them, as a group's device host
serves ``vm run --group``), the other by two device processes (linked by the group's Unix
socket, as members of different first groups are). This process drives the guests with the test
driver (:mod:`vsockrpc.vhost.testing`), no QEMU. In each pair guest A connects to guest B by
CID: a crc32-checked warm-up (untimed), then timed one-way streams A → B and 64-byte round
trips, the two pairs' rounds alternating. Every timed stream must end exactly (every byte, then
A's EOF) or no figure is produced. Both guests of a pair share this one thread, so the figures
include the driver's own cost twice.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from vsockrpc.bench._device_alone import (
    STALL_SECONDS,
    TransferFailed,
    bench_guest,
    device_process,
    group_device_process,
)
from vsockrpc.bench._private import GuestDriver
from vsockrpc.vhost.packet import SHUTDOWN_SEND
from vsockrpc.vhost.testing import GuestStream, pump_all

#: The two ways of serving a group's guests, as the figures name them.
ONE, TWO = "one device process", "two device processes"
GROUP = "bench"
MiB = 1 << 20


@contextlib.contextmanager
def _guests(workdir: Path, mode: str, cid_a: int) -> Iterator[tuple[GuestDriver, GuestDriver]]:
    groups = str(workdir / f"groups-{cid_a}")
    cids = (cid_a, cid_a + 1)
    paths = [(str(workdir / f"sib{c}.vhost"), str(workdir / f"sib{c}.vsock"), c) for c in cids]
    with contextlib.ExitStack() as stack:
        if mode == ONE:
            stack.enter_context(group_device_process(paths, group=GROUP, groups_dir=groups))
        else:
            for vhost, uds, cid in paths:
                extra = ["--group", GROUP, "--groups-dir", groups]
                stack.enter_context(device_process(vhost, uds, cid=cid, extra=extra))
        guests = []
        for vhost, _uds, cid in paths:
            g = stack.enter_context(bench_guest(vhost, cid))
            g.boot()
            guests.append(g)
        yield guests[0], guests[1]


def _link(a: GuestDriver, b: GuestDriver, port: int) -> tuple[GuestStream, GuestStream]:
    listener = b.listen(port)
    sa = a.connect_start(port, cid=b.guest_cid)
    deadline = time.monotonic() + 30
    while sa.state.value == "connecting" or not listener.backlog:
        if time.monotonic() > deadline or sa.reset:
            raise TransferFailed(f"guest↔guest: connect to CID {b.guest_cid} port {port} failed")
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
) -> dict[str, dict[str, list[float]]]:
    """``{"MBps": {mode: [...]}, "rtt": {mode: [...]}}`` for each mode (:data:`ONE`,
    :data:`TWO`): ``rounds`` timed ``total``-byte streams guest A → guest B after a checked
    warm-up, and ``pings`` 64-byte round trips (seconds) in ``rounds`` parts, alternating."""
    out: dict[str, dict[str, list[float]]] = {"MBps": {ONE: [], TWO: []}, "rtt": {ONE: [], TWO: []}}
    with _guests(workdir, ONE, 43) as one, _guests(workdir, TWO, 53) as two:
        pairs = {ONE: one, TWO: two}
        port = 9000
        for a, b in pairs.values():
            _stream(a, b, port, min(total, 64 * MiB), check=True)
        for n in range(rounds):
            port += 2
            order = (ONE, TWO) if n % 2 == 0 else (TWO, ONE)
            for mode in order:
                a, b = pairs[mode]
                step(f"guest↔guest, {mode}: {total // MiB} MiB, round {n + 1} of {rounds}")
                out["MBps"][mode].append(_stream(a, b, port, total, check=False))
                out["rtt"][mode] += _rtt(a, b, port + 1, max(1, pings // rounds))
    return out
