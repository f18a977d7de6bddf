"""Regression: ring indices published while the other side reads them from another process.

``struct.Struct.pack_into`` zero-fills its target before writing the fields, so publishing
``used.idx`` (device) or ``avail.idx`` (test driver) with it let a concurrent reader in another
process see the index drop to 0 for an instant. The driver then took ~65 000 stale used entries
for new packets (phantom bytes: a bogus 2.7 GB/s figure) and overfilled the avail ring; the
device, reading ``avail.idx == 0``, took the ring for corrupted and reset every connection (the
host sender of ``bench/bench_device.py`` died with BrokenPipeError, ~1 run in 3-5 of 2 GiB).
A reader in another *thread* never sees it (the GIL covers the whole ``pack_into``), so these
tests read from a separate process, as QEMU's guest and the device do.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import pytest

from vsockrpc.addresses import HybridAddress
from vsockrpc.transport import hybrid
from vsockrpc.vhost.memory import GuestMemory
from vsockrpc.vhost.testing import GuestDriver, GuestStream, RxLayout
from vsockrpc.vhost.virtqueue import Virtqueue

MiB = 1 << 20
CID = 9

# The publisher keeps the index in [BASE, BASE + WINDOW] (it winds it back now and then), so any
# other value a reader sees is a torn or transient write.
BASE = 0x1234  # far from 0: a transient 0 is unmistakable
WINDOW = 64

# A separate process spins on one le16 index in the memfd for SECONDS and counts the values it
# saw outside [BASE, BASE + WINDOW].
READER = """
import mmap, sys, time
fd, offset, seconds, base, window = (int(a) if a.isdigit() else float(a) for a in sys.argv[1:])
mm = mmap.mmap(fd, offset + 2)
index = memoryview(mm)[offset : offset + 2].cast("H")  # one 16-bit load per read
print("ready", flush=True)
reads = bad = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(5000):
        if (index[0] - base) & 0xFFFF > window:
            bad += 1
    reads += 5000
del index
print(reads, bad, flush=True)
"""


def _race_reader(memfd: int, offset: int, publish: Callable[[], None], seconds: float) -> int:
    """Run ``publish`` in a loop while a reader process watches the le16 at ``offset``; return
    how many values outside [BASE, BASE + WINDOW] the reader saw."""
    with subprocess.Popen(
        [sys.executable, "-c", READER, *map(str, (memfd, offset, seconds, BASE, WINDOW))],
        pass_fds=[memfd],
        stdout=subprocess.PIPE,
        text=True,
    ) as reader:
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "ready"
            while reader.poll() is None:
                for _ in range(200):
                    publish()
            out = reader.stdout.read().split()
        finally:
            reader.kill()
    assert reader.returncode == 0 and len(out) == 2, out
    reads, bad = int(out[0]), int(out[1])
    assert reads > 10_000  # the reader really raced the publisher
    return bad


@pytest.mark.timeout(60)
def test_device_publishes_used_idx_in_one_store() -> None:
    """A guest polling used.idx never sees it step back while the device pushes and flushes."""
    size, ring_gpa = 1 << 16, 0x1000
    memfd = os.memfd_create("regress-guest", os.MFD_CLOEXEC)
    mem = GuestMemory()
    try:
        os.ftruncate(memfd, size)
        mem.add_region(memfd, 0, size, 0x7F0000000000, 0)
        vq = Virtqueue(0, writable=True)
        vq.set_num(128)
        vq.desc_addr = 0x7F0000000000 + ring_gpa
        vq.avail_addr = 0x7F0000000000 + ring_gpa + 0x1000
        vq.used_addr = 0x7F0000000000 + ring_gpa + 0x2000
        vq.enabled = True
        vq.last_avail_idx = BASE
        vq.start(mem)
        vq.push(0, 44)
        vq.flush()

        def publish() -> None:
            if vq.used_idx - BASE >= WINDOW:
                vq.used_idx = BASE  # wind back: the reader's range check stays exact
            vq.push(0, 44)
            vq.flush()

        bad = _race_reader(memfd, ring_gpa + 0x2000 + 2, publish, 2.0)
        assert bad == 0, f"the guest read a used.idx that was never published {bad} times"
        vq.stop()
    finally:
        mem.clear()
        os.close(memfd)


@pytest.mark.timeout(60)
def test_driver_publishes_avail_idx_in_one_store() -> None:
    """The test driver (playing the guest) publishes avail.idx the same way: in one store."""
    d = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    path = os.path.join(d, "vhost.sock")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(path)
        server.listen()  # the driver only needs to connect: rings are written locally
        with GuestDriver(path, guest_cid=CID) as g:
            g.avail_idx[0] = BASE
            g.post_rx([0])

            def publish() -> None:
                if g.avail_idx[0] - BASE >= WINDOW:
                    g.avail_idx[0] = BASE  # wind back, as above
                g.post_rx([0])  # re-posts rx buffer 0: descriptor, ring entry, then avail.idx

            bad = _race_reader(g.memfd, g.avail[0] + 2, publish, 2.0)
        assert bad == 0, f"the device read an avail.idx that was never published {bad} times"
    finally:
        server.close()
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture
def device_process() -> Iterator[tuple[str, str]]:
    """The device as its own process (``vsockrpc device``), as bench/ and vm/ run it."""
    d = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    vhost, uds = os.path.join(d, "vhost.sock"), os.path.join(d, "vm.vsock")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "vsockrpc.cli.main", "device"),
            *("--socket", vhost, "--uds", uds, "--cid", str(CID)),
        ],
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(uds):
            assert proc.poll() is None, "device exited at start-up"
            assert time.monotonic() < deadline, "device did not start"
            time.sleep(0.01)
        yield vhost, uds
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def _send_all(uds: str, port: int, data: bytes, result: dict[str, object]) -> None:
    try:
        with hybrid.connect(HybridAddress(uds, port), timeout=30) as s:
            s.settimeout(30)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            result["eof"] = s.recv(1) == b""  # the guest closes after reading everything
    except BaseException as err:  # reported by the test
        result["error"] = err


def sender_done(sender: threading.Thread, stream: GuestStream) -> Callable[[], bool]:
    return lambda: not sender.is_alive() or stream.reset


@pytest.mark.timeout(240)
def test_repeated_bulk_transfers_arrive_exactly(device_process: tuple[str, str]) -> None:
    """Host → guest bulk streams through a device in its own process, each checked for exact
    length and crc32, no reset and a clean end on both sides (the bench's failure, in small)."""
    vhost, uds = device_process
    data = os.urandom(48 * MiB)
    crc = zlib.crc32(data)
    with GuestDriver(
        vhost, guest_cid=CID, rx_buf_size=3776, rx_layout=RxLayout.SINGLE, buf_alloc=MiB
    ) as g:
        g.boot()
        listener = g.listen(7000)
        for round_ in range(10):
            result: dict[str, object] = {}
            sender = threading.Thread(target=_send_all, args=(uds, 7000, data, result))
            sender.start()
            try:
                stream = g.accept(listener, 10)
                got = 0
                digest = 0
                last_progress = time.monotonic()
                while not stream.eof:
                    g.pump(0.01)
                    chunk = stream.recv()
                    if chunk:
                        got += len(chunk)
                        digest = zlib.crc32(chunk, digest)
                        last_progress = time.monotonic()
                    assert got <= len(data), f"round {round_}: {got} bytes for {len(data)} sent"
                    assert "error" not in result, f"round {round_}: sender: {result['error']!r}"
                    assert time.monotonic() - last_progress < 20, f"round {round_}: stalled"
                assert not stream.reset, f"round {round_}: reset after {got} bytes"
                chunk = stream.recv()
                got += len(chunk)
                digest = zlib.crc32(chunk, digest)
                assert got == len(data), f"round {round_}: {got} of {len(data)} bytes"
                assert digest == crc, f"round {round_}: data corrupted"
                stream.close()
                g.wait_for(sender_done(sender, stream), 10, "host close")
            finally:
                sender.join(30)
            assert result == {"eof": True}, f"round {round_}: sender {result}"
