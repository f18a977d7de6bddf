#!/usr/bin/env python3
"""Guest-agent benchmark: exec round trip, and file throughput vs a raw byte stream.

Usage::

    bench/bench_agent.py                       # a local agent on a Unix socket (subprocess)
    bench/bench_agent.py --vm                  # boot the project's guest image (1 GiB RAM)
    bench/bench_agent.py hvsock:/run/x.vsock:9999   # an agent that is already running

Measured in one run, side by side:

* ``exec true`` round trip (Exec stream: start → started → exited), p50/p90 over --calls,
  next to a unary ``Ping`` round trip;
* upload and download of --size MiB through the agent's Files service (checksummed,
  written to a temporary file and renamed, in --remote-dir) vs a *raw stream* of the same
  size through the same transport: a stdlib peer started in the guest by the agent listens on
  another port (vsock in a guest, a Unix socket locally) and the host connects to it the way it
  reaches the agent (hybrid socket ``CONNECT``, or the Unix socket). Ratio = agent / raw
  (target >= 0.8). Both sides of the raw stream do the minimum (one reused buffer, bytes
  discarded or sent from memory); the agent also writes / reads the guest file and checksums.

Never connects AF_VSOCK on the host when given hvsock:/unix: addresses (the hybrid device is a
Unix socket). A ``vsock:CID:PORT`` address is for real hosts with kernel vhost-vsock only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from vsockrpc import rpc, transport
from vsockrpc.addresses import Address, HybridAddress, UnixAddress, VsockAddress, parse_address
from vsockrpc.sdk import Guest, Stdout

MIB = 1024 * 1024
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
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(where)
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
if mode == "sink":  # the minimum: one reused buffer, bytes discarded
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
    """(where the raw peer listens, in its own terms; how the host reaches it)."""
    if isinstance(agent, HybridAddress):
        return f"vsock:{RAW_PORT}", HybridAddress(agent.path, RAW_PORT)
    if isinstance(agent, VsockAddress):
        return f"vsock:{RAW_PORT}", VsockAddress(agent.cid, RAW_PORT)
    path = f"{local_dir}/raw.sock"
    return path, UnixAddress(path)


def raw_transfer(guest: Guest, agent: Address, mode: str, size: int, local_dir: str) -> float:
    """Seconds to move ``size`` bytes through a raw stream (``sink``: host→guest)."""
    where, address = _raw_addresses(agent, local_dir)
    with guest.exec_stream(["python3", "-c", RAW_PEER, mode, where, str(size)]) as peer:
        events = iter(peer)
        if not any(isinstance(e, Stdout) and b"ready" in e.data for e in events):
            raise SystemExit(f"the raw peer did not start: {peer.exited}")
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
                assert got == size, got
            else:
                buf = bytearray(MIB)
                got = 0
                while k := sock.recv_into(buf):
                    got += k
                assert got == size, got
            elapsed = time.perf_counter() - start
        for _ in events:
            pass
    return elapsed


def agent_transfer(guest: Guest, remote: str, size: int) -> tuple[float, float]:
    start = time.perf_counter()
    guest.upload(ZeroReader(size), remote, size=size)  # type: ignore[arg-type]
    up = time.perf_counter() - start
    start = time.perf_counter()
    info = guest.download(remote, NullSink())  # type: ignore[arg-type]
    down = time.perf_counter() - start
    assert info.size == size
    guest.remove(remote)
    return up, down


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def run(address: Address, *, size_mib: int, calls: int, remote_dir: str, rounds: int) -> None:
    size = size_mib * MIB
    with Guest(address, wait=120) as guest, tempfile.TemporaryDirectory(dir="/tmp") as local:
        guest.run(["true"])  # warm up
        execs = []
        for _ in range(calls):
            start = time.perf_counter()
            guest.run(["true"], check=True)
            execs.append(time.perf_counter() - start)
        pings = [guest.ping() for _ in range(calls)]
        print(f"target: {address}")
        print(
            f"exec true round trip: p50 {_p(execs, 0.5) * 1e3:.2f} ms, "
            f"p90 {_p(execs, 0.9) * 1e3:.2f} ms   "
            f"(Ping: p50 {_p(pings, 0.5) * 1e3:.2f} ms)"
        )
        times: dict[str, list[float]] = {}
        remote = f"{remote_dir}/bench-agent.bin"
        with Guest(address, checksum="sha256") as sha_guest:
            for _ in range(rounds):  # interleaved so drift hits every variant alike
                times.setdefault("raw up", []).append(
                    raw_transfer(guest, address, "sink", size, local)
                )
                for name, g in (("crc32", guest), ("sha256", sha_guest)):
                    up, down = agent_transfer(g, remote, size)
                    times.setdefault(f"{name} up", []).append(up)
                    times.setdefault(f"{name} down", []).append(down)
                times.setdefault("raw down", []).append(
                    raw_transfer(guest, address, "source", size, local)
                )
        rate = {k: size_mib / statistics.median(v) for k, v in times.items()}
        print(f"{size_mib} MiB, median of {rounds}, MiB/s (ratio to the raw stream):")
        print("  raw: a stdlib peer that discards what it receives / sends zeros from memory;")
        print(f"  agent: writes a temporary file in {remote_dir}, checks it, fsyncs and renames")
        print("  it (upload) / reads the file back (download), checksummed end to end")
        print("                        raw     agent+crc32(default)  agent+sha256")
        for label, key in (("upload   (host→guest)", "up"), ("download (guest→host)", "down")):
            raw = rate[f"raw {key}"]
            crc, sha = rate[f"crc32 {key}"], rate[f"sha256 {key}"]
            agent = f"{crc:7.1f} ({crc / raw:4.2f})        {sha:7.1f} ({sha / raw:4.2f})"
            print(f"  {label} {raw:7.1f}  {agent}")


@contextlib.contextmanager
def local_agent() -> Iterator[Address]:
    with tempfile.TemporaryDirectory(prefix="bench-agent-", dir="/tmp") as d:
        address = f"unix:{d}/agent.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "vsockrpc.guest", "--listen", address],
            stderr=subprocess.DEVNULL,
        )
        try:
            rpc.wait_until_ready(address, timeout=30)
            yield parse_address(address)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextlib.contextmanager
def booted_vm() -> Iterator[Address]:
    from vsockrpc.image import build_image
    from vsockrpc.vm import launch

    with launch(build_image(), memory_mib=1024, ready_timeout=240) as machine:
        yield machine.address()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", nargs="?", help="a running agent (default: start one)")
    parser.add_argument("--vm", action="store_true", help="boot the project's guest image")
    parser.add_argument("--size", type=int, default=256, help="MiB per transfer (default 256)")
    parser.add_argument("--calls", type=int, default=50, help="exec round trips to time")
    parser.add_argument("--rounds", type=int, default=3, help="transfers of each kind")
    parser.add_argument("--remote-dir", default="/tmp", help="guest directory for the file")
    args = parser.parse_args()
    if args.address:
        context: contextlib.AbstractContextManager[Address] = contextlib.nullcontext(
            parse_address(args.address)
        )
    else:
        context = booted_vm() if args.vm else local_agent()
    with context as address:
        run(
            address,
            size_mib=args.size,
            calls=args.calls,
            remote_dir=args.remote_dir,
            rounds=args.rounds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
