"""``forward`` part: host → guest through ``vsockrpc forward`` vs a direct hybrid stream.

The guest is the device alone (:mod:`vsockrpc.bench._device_alone`: ``vsockrpc device`` in a
child process, the test driver as its guest, no QEMU), so the figure isolates what the
forwarder adds. ``direct``: a host process connects to the device's hybrid socket
(``CONNECT``/``OK``) and streams to the guest port. ``forward``: the same sender connects to a
``vsockrpc forward ADDRESS --listen tcp:127.0.0.1:0 --to PORT`` process (the CLI, as a user
runs it), which opens the hybrid stream and pumps with splice(2). Rounds alternate the two so
drift from other load hits both alike; every run must deliver exactly (see ``_h2g_alone``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vsockrpc.bench import _model
from vsockrpc.bench._context import Context
from vsockrpc.bench._device_alone import GUEST_CID, MiB, _h2g_alone, device_process
from vsockrpc.bench._private import GuestDriver, RxLayout
from vsockrpc.errors import VsockRpcError

NAME = "forward"
TITLE = "host → guest through vsockrpc forward vs a direct hybrid stream"
PATHS = ("direct hybrid stream", "vsockrpc forward (TCP → hybrid)")


@contextmanager
def forwarder(uds: str, port: int, log: Path) -> Iterator[str]:
    """A ``vsockrpc forward`` process to guest ``port`` (its stderr in ``log``); yields its TCP
    address."""
    listen = ["--listen", "tcp:127.0.0.1:0", "--to", str(port)]
    with log.open("a") as stderr:
        proc = subprocess.Popen(
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


def run(ctx: Context) -> _model.PartResult:
    total, rounds = (32 * MiB, 3) if ctx.quick else (256 * MiB, 5)
    vhost, uds = str(ctx.workdir / "fwd.vhost"), str(ctx.workdir / "fwd.vsock")
    log = ctx.workdir / "forward.log"
    series: dict[str, list[float]] = {path: [] for path in PATHS}
    with (
        device_process(vhost, uds),
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
    paths = {
        "guest": "the userspace device driven by the test driver (no QEMU)",
        PATHS[0]: "sender → device hybrid socket (CONNECT/OK)",
        PATHS[1]: "sender → TCP 127.0.0.1 → vsockrpc forward (splice) → device hybrid socket",
    }
    return _model.part_result(NAME, TITLE, paths, [figure])
