"""``forward`` part: host → guest through ``vsockrpc forward`` vs a direct hybrid stream.

Device-alone half (always): the guest is the device alone
(:mod:`vsockrpc.bench._device_alone`: ``vsockrpc device`` in a child process, the test driver
as its guest, no QEMU), so the figure isolates what the forwarder adds. ``direct``: a host
process connects to the device's hybrid socket (``CONNECT``/``OK``) and streams to the guest
port. ``forward``: the same sender connects to a ``vsockrpc forward ADDRESS --listen
tcp:127.0.0.1:0 --to PORT`` process (the CLI, as a user runs it), which passes each accepted
connection to the device with its ``CONNECT`` (our device's passed streams; on another device
it would pump with splice(2)). Rounds alternate the two so drift from other load hits both
alike; every run must deliver exactly (see ``_h2g_alone``).

Guest half (not in ``--quick``): the project's image booted in QEMU (TCG here), a sink in the
guest (python3, AF_VSOCK, started through the agent) counts what arrives and answers the count;
the same two paths alternate, through the real device and guest kernel.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vsockrpc import transport
from vsockrpc.addresses import HybridAddress
from vsockrpc.bench import _model
from vsockrpc.bench._context import Context
from vsockrpc.bench._device_alone import MiB, _h2g_alone, bench_guest, device_process
from vsockrpc.errors import VsockRpcError
from vsockrpc.transport import hybrid
from vsockrpc.vm.procs import popen_dying_with_parent

NAME = "forward"
TITLE = "host → guest through vsockrpc forward vs a direct hybrid stream"
PATHS = ("direct hybrid stream", "vsockrpc forward (TCP → hybrid)")


@contextmanager
def forwarder(uds: str, port: int, log: Path) -> Iterator[str]:
    """A ``vsockrpc forward`` process to guest ``port`` (its stderr in ``log``); yields its TCP
    address."""
    listen = ["--listen", "tcp:127.0.0.1:0", "--to", str(port)]
    with log.open("a") as stderr:
        proc = popen_dying_with_parent(
            [sys.executable, "-m", "vsockrpc.cli.main", "forward", f"hvsock:{uds}:9999", *listen],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "forwarding tcp:127.0.0.1:PORT -> guest port N"
        if not line.startswith("forwarding tcp:"):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise VsockRpcError(f"forward bench: the forwarder did not start: {tail}")
        yield line.split()[1]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Counts the bytes of each connection to the guest port and answers the count (in the guest).
GUEST_SINK = """
import socket, sys
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
buf = bytearray(1 << 20)
while True:
    c, _ = s.accept()
    n = 0
    while r := c.recv_into(buf):
        n += r
    c.sendall(str(n).encode())
    c.close()
"""
GUEST_PORT = 7000


def _stream(sock: socket.socket, total: int) -> float:
    """MB/s of sending ``total`` bytes on ``sock`` until the sink's count is back (checked)."""
    block = memoryview(bytes(MiB))
    with sock:
        sock.settimeout(120)
        start = time.perf_counter()
        for offset in range(0, total, MiB):
            sock.sendall(block[: min(MiB, total - offset)])
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(32)
        elapsed = time.perf_counter() - start
    if answer != str(total).encode():
        raise VsockRpcError(f"forward bench: the guest sink counted {answer!r} of {total} bytes")
    return total / elapsed / 1e6


def _with_guest(ctx: Context, log: Path) -> tuple[_model.Figure, str]:
    from vsockrpc.image import build_image
    from vsockrpc.sdk import Guest, Stdout
    from vsockrpc.vm import launch

    total, rounds = 64 * MiB, 6  # cheap next to the boot; fewer gave ±10 % between runs
    ctx.step(NAME, "building or finding the guest image, booting it")
    with launch(build_image(), ready_timeout=300) as machine, Guest(machine.address()) as g:
        uds = machine.hybrid_socket
        if uds is None:
            raise VsockRpcError("forward bench: the guest half needs the userspace device")
        guest_path = f"{machine.accel.name.upper()}, the project's image, userspace device"
        with g.exec_stream(["python3", "-c", GUEST_SINK, str(GUEST_PORT)]) as sink:
            if not any(isinstance(e, Stdout) and b"ready" in e.data for e in sink):
                raise VsockRpcError("forward bench: the guest sink did not start")
            series: dict[str, list[float]] = {path: [] for path in PATHS}
            with forwarder(str(uds), GUEST_PORT, log) as via:
                for n in range(rounds):
                    ctx.step(NAME, f"guest: {total // MiB} MiB each path, round {n + 1}")
                    for path in PATHS if n % 2 == 0 else PATHS[::-1]:
                        if path == PATHS[0]:
                            sock = hybrid.connect(HybridAddress(str(uds), GUEST_PORT), timeout=60)
                        else:
                            sock = transport.connect(via, timeout=60)
                        series[path].append(_stream(sock, total))
            sink.signal(15)
    title = f"host → guest throughput, {total // MiB} MiB per run (a booted guest)"
    return _model.figure(f"{NAME}.guest", title, "rate", series, unit="MB/s"), guest_path


def run(ctx: Context) -> _model.PartResult:
    total, rounds = (32 * MiB, 3) if ctx.quick else (256 * MiB, 5)
    vhost, uds = str(ctx.workdir / "fwd.vhost"), str(ctx.workdir / "fwd.vsock")
    log = ctx.workdir / "forward.log"
    series: dict[str, list[float]] = {path: [] for path in PATHS}
    with (
        device_process(vhost, uds),
        bench_guest(vhost) as g,
    ):
        g.boot()
        port = 9100
        with forwarder(uds, port, log) as via:  # integrity first: crc32-checked, untimed
            _h2g_alone(g, uds, port, min(total, 16 * MiB), check=True, via=via)
        for n in range(rounds):
            ctx.step(NAME, f"{total // MiB} MiB each path, round {n + 1} of {rounds}")
            order = PATHS if n % 2 == 0 else PATHS[::-1]
            for path in order:
                port += 1
                if path == PATHS[0]:
                    r = _h2g_alone(g, uds, port, total, check=False)
                else:
                    with forwarder(uds, port, log) as via:
                        r = _h2g_alone(g, uds, port, total, check=False, via=via)
                series[path].append(r["MBps"])
    figure = _model.figure(
        f"{NAME}.h2g",
        f"host → guest throughput, {total // MiB} MiB per run (device alone as the guest)",
        "rate",
        series,
        unit="MB/s",
    )
    figures = [figure]
    paths = {
        "guest": "the userspace device driven by the test driver (no QEMU)",
        PATHS[0]: "sender → device hybrid socket (CONNECT/OK)",
        PATHS[1]: (
            "sender → TCP 127.0.0.1 → device: vsockrpc forward accepts and passes the"
            " connection to the device with its CONNECT (it splices only on a device without"
            " passed streams)"
        ),
    }
    notes = []
    if ctx.quick:
        notes.append("--quick: the guest half (a TCG boot) was not run")
    else:
        guest_figure, paths["booted guest"] = _with_guest(ctx, log)
        figures.append(guest_figure)
    return _model.part_result(NAME, TITLE, paths, figures, notes=notes)
