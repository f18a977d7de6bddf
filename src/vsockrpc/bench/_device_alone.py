"""The device alone: the test driver (:mod:`vsockrpc.vhost.testing`) is the guest, no QEMU.

``vsockrpc device`` runs in a child process as vm/ runs it; this process drives its virtqueues
through the vhost-user socket as a guest would, while forked host processes send to / sink from
its hybrid socket. Each direction first moves 64 MiB crc32-checked (untimed), then the timed runs,
which must also end exactly (every byte, then a clean EOF) or no figure is produced.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vsockrpc import transport
from vsockrpc.addresses import HybridAddress
from vsockrpc.bench._private import GuestDriver, RxLayout
from vsockrpc.transport import hybrid

GUEST_CID = 42
MiB = 1 << 20


def bench_guest(vhost: str, guest_cid: int = GUEST_CID) -> GuestDriver:
    """The test driver as the benchmarks' guest: one 64 KiB rx buffer per packet, 256 MiB of
    guest memory, 4 MiB of credit per connection (the same guest for every device figure)."""
    return GuestDriver(
        vhost,
        guest_cid=guest_cid,
        rx_buf_size=44 + 65536,
        rx_layout=RxLayout.SINGLE,
        mem_size=256 * MiB,
        buf_alloc=4 * MiB,
    )


@contextmanager
def device_process(
    vhost: str, uds: str, *, cid: int = GUEST_CID, extra: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """``vsockrpc device`` for guest ``cid`` on ``vhost``/``uds`` (``extra``: more device
    options, e.g. ``--group``); stopped when the block ends."""
    with _device(["--socket", vhost, "--uds", uds, "--cid", str(cid), *extra], uds) as proc:
        yield proc


@contextmanager
def group_device_process(
    guests: Sequence[tuple[str, str, int]], *, group: str, groups_dir: str
) -> Iterator[subprocess.Popen[bytes]]:
    """One ``vsockrpc device`` serving several guests of ``group`` (``--vm``, one per
    ``(vhost, uds, cid)``), as a group's device host does for ``vm run --group``."""
    specs: list[str] = []
    for vhost, uds, cid in guests:
        specs += ["--vm", f"guest-cid={cid},socket={vhost},uds-path={uds},groups={group}"]
    with _device([*specs, "--groups-dir", groups_dir], guests[-1][1]) as proc:
        yield proc


@contextmanager
def _device(args: Sequence[str], ready: str) -> Iterator[subprocess.Popen[bytes]]:
    """The device with ``args``, ready once ``ready`` (its last hybrid socket) exists."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vsockrpc.cli.main",
            "device",
            *args,
            "--exit-with-pid",  # a benchmark killed with SIGKILL leaves no device behind
            str(os.getpid()),
        ],
    )
    spy = None
    try:
        # BENCH_DEVICE_PYSPY=/tmp/dev.txt: py-spy records the device (raw collapsed stacks) until
        # it exits. Attached by pid, not wrapped around it: a wrapper stops without its child.
        profile = os.environ.get("BENCH_DEVICE_PYSPY")
        if profile:
            record = ["py-spy", "record", "--pid", str(proc.pid), "--format", "raw", "-o", profile]
            spy = subprocess.Popen(record, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("device did not start")
            time.sleep(0.01)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if spy is not None:
            try:
                spy.wait(30)  # it writes the profile once the device has exited
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()


def hybrid_connect(uds: str, port: int) -> socket.socket:
    """The project's hybrid client (``CONNECT``/``OK``), with a 60 s bound on every later call."""
    s = hybrid.connect(HybridAddress(uds, port), timeout=60)
    s.settimeout(60)
    return s


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


def _host_sender(
    uds: str, port: int, block: bytes, total: int, *, via: str | None = None, cpu: Any = None
) -> None:
    """Send ``total`` bytes (``block`` repeated), then wait for the guest's close. Exit status 0
    only if everything was written and the stream then ended cleanly. ``via``: an address that
    forwards to the guest port (e.g. a ``vsockrpc forward`` listener) to send through instead.
    ``cpu``: set to this process's CPU seconds at the end."""
    if via is None:
        s = hybrid_connect(uds, port)
    else:
        s = transport.connect(via, timeout=60)
        s.settimeout(60)
    cpu0 = cpu_seconds(os.getpid())  # the transfer's CPU only, not the process's start-up
    sent = 0
    while sent < total:
        n = min(len(block), total - sent)
        s.sendall(block[:n])  # BrokenPipeError / ConnectionResetError: exit status 1
        sent += n
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    if cpu is not None:
        cpu.value = cpu_seconds(os.getpid()) - cpu0


def _host_sink(uds: str, port: int, total: int, *, got: Any, crc: Any, cpu: Any) -> None:
    """Accept the guest's connection; record the bytes received (and their crc32 if ``crc``
    is given: ``crc.value`` is -1 for "do not check") and, at the end, this process's CPU
    seconds in ``cpu``."""
    os.umask(0o077)  # the listening socket: owner only
    srv = socket.socket(socket.AF_UNIX)
    # Listen under a temporary name, then rename: the parent treats the path's existence as
    # "ready", and a connect between bind and listen would be refused.
    srv.bind(f"{uds}_{port}.tmp")
    srv.listen()
    os.rename(f"{uds}_{port}.tmp", f"{uds}_{port}")
    peer, _ = srv.accept()
    cpu0 = cpu_seconds(os.getpid())  # the transfer's CPU only, not the process's start-up
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
    cpu.value = cpu_seconds(os.getpid()) - cpu0


def _repeated_crc(block: bytes, total: int) -> int:
    crc = 0
    for off in range(0, total, len(block)):
        crc = zlib.crc32(memoryview(block)[: min(len(block), total - off)], crc)
    return crc


def _h2g_alone(
    g: GuestDriver, uds: str, port: int, total: int, *, check: bool, via: str | None = None
) -> dict[str, float]:
    """Host → guest through the device alone. ``check``: the driver crc32s what arrives
    (untimed integrity run); otherwise it just counts, and the transfer must still end exactly:
    every byte, then the host's EOF (SHUTDOWN), no RST, the sender exiting 0. ``via``: see
    :func:`_host_sender`."""
    ctx = multiprocessing.get_context("forkserver")  # no fork of a threaded (grpc) process
    block = os.urandom(4 * MiB)
    listener = g.listen(port)
    sender_cpu = ctx.Value("d", 0.0)
    sender = ctx.Process(
        target=_host_sender,
        args=(uds, port, block, total),
        kwargs={"via": via, "cpu": sender_cpu},
    )
    sender.start()
    try:
        stream = g.accept(listener, 60)
        stream.discard = not check
        digest = 0
        packets = 0
        got = 0
        t0 = time.perf_counter()
        driver0 = time.thread_time()  # the driver runs in this thread only
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
        driver_cpu = time.thread_time() - driver0
        if got != total:
            raise TransferFailed(f"host→guest: EOF after {got} of {total} bytes")
        if check and digest != _repeated_crc(block, total):
            raise TransferFailed("host→guest: checksum mismatch")
        stream.close()
        g.wait_for(lambda: not sender.is_alive() or stream.reset, 10, "host close")
        sender.join(10)
        if sender.exitcode != 0:
            raise TransferFailed(f"host→guest: sender exited {sender.exitcode}")
        return _result(total, elapsed, packets, driver_cpu, sender_cpu.value)
    finally:
        if sender.is_alive():
            sender.kill()
        sender.join()
        g.listeners.pop(port, None)


def _result(
    total: int, elapsed: float, packets: int, driver_cpu: float, host_cpu: float
) -> dict[str, float]:
    """One run: MB/s, packets/s and the CPU seconds of the test driver and the host peer."""
    return {
        "MBps": total / elapsed / 1e6,
        "pps": packets / elapsed,
        "elapsed": elapsed,
        "driver_cpu": driver_cpu,
        "host_cpu": host_cpu,
    }


def _g2h_alone(g: GuestDriver, uds: str, port: int, total: int, *, check: bool) -> dict[str, float]:
    """Guest → host through the device alone; the sink must receive exactly ``total`` bytes
    (crc32-checked when ``check``)."""
    ctx = multiprocessing.get_context("forkserver")  # no fork of a threaded (grpc) process
    # One writer (the sink, after every read) and one reader: no lock, which would cost the
    # sink a semaphore round per read.
    got = ctx.Value("q", 0, lock=False)
    crc = ctx.Value("q", 0 if check else -1)
    sink_cpu = ctx.Value("d", 0.0)
    sink = ctx.Process(
        target=_host_sink, args=(uds, port, total), kwargs={"got": got, "crc": crc, "cpu": sink_cpu}
    )
    sink.start()
    try:
        deadline = time.monotonic() + 60  # the sink process starts under load
        while not os.path.exists(f"{uds}_{port}"):
            if not sink.is_alive() or time.monotonic() > deadline:
                raise TransferFailed(f"guest→host: the sink did not listen (exit {sink.exitcode})")
            time.sleep(0.01)
        stream = g.connect(port)
        block = os.urandom(64 * 1024)
        chunk = memoryview(block)
        queued = 0
        t0 = time.perf_counter()
        driver0 = time.thread_time()  # the driver runs in this thread only
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
        driver_cpu = time.thread_time() - driver0
        if sink.exitcode != 0 or got.value != total:
            raise TransferFailed(
                f"guest→host: sink got {got.value} of {total} bytes (exit {sink.exitcode})"
            )
        if check and crc.value != _repeated_crc(block, total):
            raise TransferFailed("guest→host: checksum mismatch")
        return _result(total, elapsed, packets, driver_cpu, sink_cpu.value)
    finally:
        if sink.is_alive():
            sink.kill()
        sink.join()


def backend_alone(
    workdir: Path, total: int, rounds: int, step: Callable[[str], None]
) -> dict[str, list[float]]:
    """Each direction: a crc32-checked run of up to 64 MiB (untimed), then ``rounds`` timed
    ``total``-byte runs, alternating directions; every run must end exactly (see _h2g_alone /
    _g2h_alone) or :class:`TransferFailed` is raised. Returns per-run lists keyed
    ``{h2g,g2h}_{MBps,pps,cpu}`` (``cpu``: MB moved per CPU-second of the device process)."""
    vhost, uds = str(workdir / "alone.vhost"), str(workdir / "alone.vsock")
    out: dict[str, list[float]] = {}
    runs: tuple[tuple[str, Callable[..., dict[str, float]]], ...] = (
        ("h2g", _h2g_alone),
        ("g2h", _g2h_alone),
    )
    with (
        device_process(vhost, uds) as dev,
        bench_guest(vhost) as g,
    ):
        g.boot()
        port = 9000
        for _key, run in runs:
            run(g, uds, port, min(total, 64 * MiB), check=True)
            port += 1
        for n in range(rounds):
            step(f"device alone: {total // MiB} MiB each way, round {n + 1} of {rounds}")
            for key, run in runs:
                cpu0 = cpu_seconds(dev.pid)
                r = run(g, uds, port, total, check=False)
                cpu = cpu_seconds(dev.pid) - cpu0
                out.setdefault(f"{key}_MBps", []).append(r["MBps"])
                out.setdefault(f"{key}_pps", []).append(r["pps"])
                rates = [total / c / 1e6 for c in (cpu, r["driver_cpu"], r["host_cpu"]) if c > 0]
                if len(rates) == 3:
                    for suffix, rate in zip(("cpu", "cpu_guest", "cpu_host"), rates, strict=True):
                        out.setdefault(f"{key}_{suffix}", []).append(rate)
                    out.setdefault(f"{key}_bound", []).append(cpu_bound(rates))
                port += 1
    return out


def cpu_bound(rates: Sequence[float], cores: int | None = None) -> float:
    """The rate (MB/s) that processes moving the same bytes at ``rates`` MB per CPU-second each
    allow together on ``cores`` cores: the cores' time divided by the CPU time per MB, and no
    process faster than one core."""
    if cores is None:
        cores = len(os.sched_getaffinity(0))
    return min(*rates, cores / sum(1 / rate for rate in rates))
