"""``agent`` part: the guest agent's exec round trip, and its file transfers vs a raw stream.

Full run: boots the project's guest image (``vsockrpc.vm.launch``, 1 GiB RAM). With ``--quick``
(when named explicitly) it starts a local agent on a Unix socket instead, no guest.

* ``exec true`` round trip (Exec stream: start → started → exited) next to a unary ``Ping``;
* upload and download of a file through the agent's Files service (checksummed, written to a
  temporary file and renamed) vs a *raw stream* of the same size through the same transport: a
  stdlib peer started in the guest by the agent listens on another port and the host reaches it
  the way it reaches the agent (hybrid ``CONNECT``, or the Unix socket). Both raw ends do the
  minimum (one reused buffer, bytes discarded or sent from memory);
* what the agent does on top of the raw stream, each step alone where the agent runs (a stdlib
  probe over a 1 MiB buffer: CRC-32, SHA-256, writing and fsyncing a file in /tmp, reading it
  back). On one CPU the steps add up: ``1/agent ≥ 1/raw + 1/checksum (+ 1/file copy)``, so a
  checksum no faster than the raw stream caps agent ÷ raw at 0.5.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

from vsockrpc import rpc, transport
from vsockrpc.addresses import Address, parse_address
from vsockrpc.agent.datachannel import usable_cpus
from vsockrpc.bench import _model
from vsockrpc.bench._context import Context
from vsockrpc.errors import VsockRpcError
from vsockrpc.sdk import Guest, Stdout
from vsockrpc.vm.procs import popen_dying_with_parent

NAME = "agent"
TITLE = "guest agent: exec round trip, file transfers vs a raw stream"
MIB = 1 << 20
RAW_PORT = 7411

# Runs in the guest (or locally) with only the standard library: one connection, then exit.
RAW_PEER = r"""
import socket, sys
mode, where, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if where.startswith("vsock:"):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, int(where[6:])))
else:
    import os
    if os.path.exists(where):
        os.unlink(where)
    os.umask(0o077)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(where)
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
if mode == "sink":
    buf = bytearray(1 << 20)
    n = 0
    while k := c.recv_into(buf):
        n += k
    c.sendall(str(n).encode())
else:
    block = bytes(1 << 20)
    left = size
    while left:
        k = min(left, len(block))
        c.sendall(block[:k])
        left -= k
c.close()
"""


# Each step the agent adds to a transfer, alone, in MB/s (stdlib only; same python3 as the agent).
FLOOR_PROBE = r"""
import hashlib, os, sys, time, zlib
size = int(sys.argv[1])
path = f"/tmp/vsockrpc-bench-probe-{os.getpid()}"
block = bytearray(os.urandom(1 << 20))
view = memoryview(block)
blocks = max(size >> 20, 1)
def crc32():
    c = 0
    for _ in range(blocks):
        c = zlib.crc32(view, c)
def sha256():
    h = hashlib.sha256()
    for _ in range(blocks):
        h.update(view)
def write():
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for _ in range(blocks):
            out = view
            while out:
                out = out[os.write(fd, out):]
        os.fsync(fd)
    finally:
        os.close(fd)
def read():
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [block]):
            pass
    finally:
        os.close(fd)
rates = []
try:
    for step in (crc32, sha256, write, read):
        start = time.perf_counter()
        step()
        rates.append((blocks << 20) / (time.perf_counter() - start) / 1e6)
finally:
    if os.path.exists(path):
        os.unlink(path)
print(" ".join(f"{r:.3f}" for r in rates))
"""
FLOOR_STEPS = ("CRC-32 alone", "SHA-256 alone", "file write + fsync alone", "file read alone")


def floor_probe(guest: Guest, size: int) -> list[float]:
    """MB/s of each of :data:`FLOOR_STEPS` over ``size`` bytes, where the agent runs."""
    done = guest.run(["python3", "-c", FLOOR_PROBE, str(size)], timeout=600)
    try:
        rates = [float(word) for word in done.stdout.split()]
    except ValueError:
        rates = []
    if not done.ok or len(rates) != len(FLOOR_STEPS):
        raise VsockRpcError(f"agent bench: the probe failed: {done.stderr.decode()[-300:]}")
    return rates


class ZeroReader:
    """A binary file of ``size`` zero bytes that needs no disk."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = bytes(MIB)

    def read(self, n: int = -1) -> bytes:
        k = self.left if n < 0 else min(n, self.left)
        self.left -= k
        return self.block[:k] if k <= len(self.block) else bytes(k)


class NullSink:
    def write(self, data: bytes) -> int:
        return len(data)


def _raw_addresses(agent: Address, local_dir: str) -> tuple[str, Address]:
    """(where the raw peer listens, in its own terms; how the host reaches it): a guest's
    vsock port beside the agent's (same device), or a Unix socket beside a local agent."""
    if str(agent).startswith(("vsock:", "hvsock:")):
        # vsock:CID:PORT and hvsock:PATH:PORT: the last colon separates the port.
        return f"vsock:{RAW_PORT}", parse_address(f"{str(agent).rsplit(':', 1)[0]}:{RAW_PORT}")
    path = f"{local_dir}/raw.sock"
    return path, parse_address(f"unix:{path}")


def raw_transfer(guest: Guest, agent: Address, mode: str, size: int, local_dir: str) -> float:
    """MB/s of ``size`` bytes through a raw stream (``sink``: host→guest)."""
    where, address = _raw_addresses(agent, local_dir)
    with guest.exec_stream(["python3", "-c", RAW_PEER, mode, where, str(size)]) as peer:
        events = iter(peer)
        if not any(isinstance(e, Stdout) and b"ready" in e.data for e in events):
            raise VsockRpcError(f"agent bench: the raw peer did not start: {peer.exited}")
        with contextlib.closing(transport.connect(address, timeout=30)) as sock:
            start = time.perf_counter()
            if mode == "sink":
                block = bytes(MIB)
                left = size
                while left:
                    k = min(left, MIB)
                    sock.sendall(block[:k])
                    left -= k
                sock.shutdown(1)
                got = int(sock.recv(64))
            else:
                buf = bytearray(MIB)
                got = 0
                while k := sock.recv_into(buf):
                    got += k
            elapsed = time.perf_counter() - start
        for _ in events:
            pass
    if got != size:
        raise VsockRpcError(f"agent bench: raw {mode} moved {got} of {size} bytes")
    return size / elapsed / 1e6


def agent_transfer(guest: Guest, remote: str, size: int) -> tuple[float, float]:
    """(upload MB/s, download MB/s) of one file through the agent."""
    start = time.perf_counter()
    guest.upload(ZeroReader(size), remote, size=size)  # type: ignore[arg-type]
    up = time.perf_counter() - start
    start = time.perf_counter()
    info = guest.download(remote, NullSink())  # type: ignore[arg-type]
    down = time.perf_counter() - start
    if info.size != size:
        raise VsockRpcError(f"agent bench: downloaded {info.size} of {size} bytes")
    guest.remove(remote)
    return size / up / 1e6, size / down / 1e6


@contextlib.contextmanager
def local_agent(ctx: Context) -> Iterator[Address]:
    address = f"unix:{ctx.workdir}/agent.sock"
    proc = popen_dying_with_parent(
        [sys.executable, "-m", "vsockrpc.guest", "--listen", address],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        rpc.wait_until_ready(address, timeout=60)
        yield parse_address(address)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def booted_vm(ctx: Context, path: dict[str, str]) -> Iterator[Address]:
    from vsockrpc.image import build_image
    from vsockrpc.vm import launch

    ctx.step(NAME, "building or finding the guest image")
    info = build_image()
    ctx.step(NAME, "booting the guest (1 GiB)")
    with launch(info, memory_mib=1024, cpus=1, ready_timeout=300) as machine:
        path["guest"] = (
            f"{machine.accel.name.upper()}, the project's image, agent as PID 1, 1 vCPU (a data "
            "channel overlaps its socket with the file and checksum only on 2 or more)"
        )
        path["guest kernel"] = str(info.manifest["kernel"]["version"])
        path["vsock device"] = (
            "userspace (vsockrpc device), hybrid socket"
            if machine.hybrid_socket is not None
            else "kernel vhost-vsock"
        )
        yield machine.address()


def run(ctx: Context) -> _model.PartResult:
    size_mib, calls, rounds = (16, 30, 2) if ctx.quick else (256, 50, 3)
    size = size_mib * MIB
    path: dict[str, str] = {}
    if ctx.quick:
        path["guest"] = (
            "none (--quick): a local agent process on a Unix socket, "
            f"{usable_cpus()} CPUs usable (data channels overlap the socket with the file and "
            "checksum on 2 or more)"
        )
        context: contextlib.AbstractContextManager[Address] = local_agent(ctx)
    else:
        context = booted_vm(ctx, path)
    rates: dict[str, dict[str, list[float]]] = {"up": {}, "down": {}}
    floor: dict[str, list[float]] = {"raw stream, download": []}
    with context as address, Guest(address, wait=120) as guest:
        guest.run(["true"])  # warm up
        ctx.step(NAME, f"{calls} exec round trips and {calls} pings")
        execs = []
        for _ in range(calls):
            start = time.perf_counter()
            guest.run(["true"], check=True)
            execs.append(time.perf_counter() - start)
        pings = [guest.ping() for _ in range(calls)]
        remote = "/tmp/vsockrpc-bench-agent.bin"
        with Guest(address, checksum="sha256") as sha_guest:
            for n in range(rounds):  # interleaved so drift hits every variant alike
                ctx.step(NAME, f"{size_mib} MiB transfers, round {n + 1} of {rounds}")
                rates["up"].setdefault("raw stream", []).append(
                    raw_transfer(guest, address, "sink", size, str(ctx.workdir))
                )
                for label, g in (("agent, crc32 (default)", guest), ("agent, sha256", sha_guest)):
                    up, down = agent_transfer(g, remote, size)
                    rates["up"].setdefault(label, []).append(up)
                    rates["down"].setdefault(label, []).append(down)
                rates["down"].setdefault("raw stream", []).append(
                    raw_transfer(guest, address, "source", size, str(ctx.workdir))
                )
                floor["raw stream, download"].append(rates["down"]["raw stream"][-1])
                probed = floor_probe(guest, min(size, 64 * MIB))
                for step, rate in zip(FLOOR_STEPS, probed, strict=True):
                    floor.setdefault(step, []).append(rate)
    rates["down"] = {"raw stream": rates["down"].pop("raw stream"), **rates["down"]}
    figures = [
        _model.figure(
            f"{NAME}.exec",
            "exec `true` round trip vs a unary Ping",
            "latency",
            {"Ping": pings, "exec true": execs},
        ),
        _model.figure(
            f"{NAME}.upload",
            f"upload (host→guest), {size_mib} MiB",
            "rate",
            rates["up"],
            unit="MB/s",
        ),
        _model.figure(
            f"{NAME}.download",
            f"download (guest→host), {size_mib} MiB",
            "rate",
            rates["down"],
            unit="MB/s",
        ),
        _model.figure(
            f"{NAME}.floor",
            "each step the agent adds, alone where the agent runs, vs the raw stream",
            "rate",
            floor,
            unit="MB/s",
        ),
    ]
    notes = [
        "raw stream: a stdlib peer that discards what it receives / sends zeros from memory; "
        "agent: writes a temporary file in /tmp, checks it, fsyncs and renames it (upload) / "
        "reads it back (download), checksummed end to end",
        "steps alone: a stdlib probe where the agent runs, over a 1 MiB buffer (at most 64 MiB "
        "per step): on one CPU the agent's rate is at most 1 / (1/raw + 1/checksum + 1/file "
        "step), whatever the transport",
    ]
    return _model.part_result(NAME, TITLE, path, figures, notes=notes)
