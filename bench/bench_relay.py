#!/usr/bin/env python3
"""Relay overhead: grpcio through one relay hop vs grpcio straight on a Unix socket.

A server process (this script with ``--server``) serves Addition and a byte-stream service on a
Unix socket. In this process, three channels reach it: ``direct`` (grpcio dials the Unix
socket), ``relay`` (``vsockrpc.rpc.channel(..., relay=True)``: grpcio dials the relay's private
socket and the relay forwards to the server's socket, as it forwards to vsock/hybrid sockets
where those can be connected) and ``relay-copy`` (the same relay with splice(2) off, copying
through a buffer: the design alternative). Calls and transfers rotate among the three so drift
hits all alike.

Reports unary Addition latency (p50/p99 over --calls calls each) and 64 MiB streaming
throughput in both directions, with relay/direct ratios. Targets: latency ratio <= 1.15,
throughput ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import grpc

from vsockrpc import rpc
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.rpc._relay import Relay
from vsockrpc.services import addition
from vsockrpc.transport import unix

STREAM = "/vsockrpc.bench.Stream/"
CHUNK = 1024 * 1024


def _download(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
    size = int(request)
    block = b"\x5a" * CHUNK
    for offset in range(0, size, CHUNK):
        yield block[: min(CHUNK, size - offset)]


def _upload(requests: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
    return str(sum(len(r) for r in requests)).encode()


def _register_stream(server: grpc.Server) -> None:
    handlers = {
        "Download": grpc.unary_stream_rpc_method_handler(_download),
        "Upload": grpc.stream_unary_rpc_method_handler(_upload),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("vsockrpc.bench.Stream", handlers),)
    )


def run_server(path: str) -> None:
    with rpc.serve([addition.register, _register_stream], [f"unix:{path}"]) as server:
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        server.stop(None)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def unary_round(stub: pb_grpc.VsockServiceStub, calls: int, out: list[float]) -> None:
    request = pb.AdditionRequest(a=5, b=7)
    for _ in range(calls):
        start = time.perf_counter()
        stub.Addition(request, timeout=10)
        out.append(time.perf_counter() - start)


def download(ch: grpc.Channel, size: int) -> float:
    start = time.perf_counter()
    got = sum(len(c) for c in ch.unary_stream(STREAM + "Download")(str(size).encode(), timeout=60))
    elapsed = time.perf_counter() - start
    assert got == size, (got, size)
    return size / elapsed


def upload(ch: grpc.Channel, size: int) -> float:
    block = b"\xa5" * CHUNK

    def chunks() -> Iterator[bytes]:
        for offset in range(0, size, CHUNK):
            yield block[: min(CHUNK, size - offset)]

    start = time.perf_counter()
    got = int(ch.stream_unary(STREAM + "Upload")(chunks(), timeout=60))
    elapsed = time.perf_counter() - start
    assert got == size, (got, size)
    return size / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="unary calls per path")
    parser.add_argument("--rounds", type=int, default=6, help="streamed transfers per direction")
    parser.add_argument("--mib", type=int, default=64, help="streamed MiB per transfer")
    parser.add_argument("--server", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        run_server(args.server)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        path = os.path.join(tmp, "server.sock")
        server = subprocess.Popen(
            [sys.executable, __file__, "--server", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            results = measure(path, args.calls, args.rounds, args.mib * 1024 * 1024)
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=30)
    report(results, args)
    return 0


Results = dict[str, dict[str, list[float]]]
PATHS = ("direct", "relay", "relay-copy")


@contextlib.contextmanager
def copying_relay_channel(path: str, tmp: str) -> Iterator[grpc.Channel]:
    """Like ``rpc.channel(..., relay=True)`` but the relay copies through a buffer
    (recv_into + sendall) instead of splice(2): the alternative the relay chose against."""

    def dial(_conn: socket.socket, _peer: object) -> socket.socket:
        return unix.connect_path(path)

    front = os.path.join(tmp, "copy-relay.sock")
    with (
        Relay(unix.listen_path(front), dial, name="copy", splice=False) as forwarder,
        grpc.insecure_channel(f"unix:{front}") as ch,
    ):
        yield ch
        forwarder.stop_accepting()


def measure(path: str, calls: int, rounds: int, size: int) -> Results:
    results: Results = {name: {"lat": [], "down": [], "up": []} for name in PATHS}
    target = f"unix:{path}"
    with (
        rpc.channel(target) as direct,
        rpc.channel(target, relay=True) as relayed,
        copying_relay_channel(path, os.path.dirname(path)) as copied,
    ):
        channels = {"direct": direct, "relay": relayed, "relay-copy": copied}
        stubs = {name: pb_grpc.VsockServiceStub(ch) for name, ch in channels.items()}  # type: ignore[no-untyped-call]
        for name, ch in channels.items():  # warm up: connect, first-call costs
            unary_round(stubs[name], 200, [])
            download(ch, CHUNK * 4)
        # Unary: rotate call by call, so load from elsewhere on the machine hits all alike.
        request = pb.AdditionRequest(a=5, b=7)
        for i in range(calls):
            for name in PATHS[i % 3 :] + PATHS[: i % 3]:
                start = time.perf_counter()
                stubs[name].Addition(request, timeout=10)
                results[name]["lat"].append(time.perf_counter() - start)
        for i in range(rounds):
            for name in PATHS[i % 3 :] + PATHS[: i % 3]:
                results[name]["down"].append(download(channels[name], size))
                results[name]["up"].append(upload(channels[name], size))
    return results


def report(results: Results, args: argparse.Namespace) -> None:
    d = results["direct"]
    print(
        f"relay benchmark: {len(d['lat'])} unary calls per path, {args.mib} MiB x "
        f"{len(d['down'])} transfers per direction, interleaved; python {sys.version.split()[0]}, "
        f"grpcio {grpc.__version__}, {os.cpu_count()} CPUs"
    )
    print("relay = vsockrpc's relay (splice); relay-copy = same relay copying via a buffer")
    header = f"{'':<20}" + "".join(f"{name:>12}" for name in PATHS)
    print(f"{header} {'unit':<6}{'relay/direct':>14}{'copy/direct':>13}  target")
    mib = 1024 * 1024
    metrics: dict[str, tuple[Callable[[dict[str, list[float]]], float], str, str]] = {
        "unary p50": (lambda r: _percentile(r["lat"], 0.5) * 1e6, "us", "<= 1.15"),
        "unary p99": (lambda r: _percentile(r["lat"], 0.99) * 1e6, "us", "<= 1.15"),
        "download (median)": (lambda r: statistics.median(r["down"]) / mib, "MiB/s", ">= 0.90"),
        "upload (median)": (lambda r: statistics.median(r["up"]) / mib, "MiB/s", ">= 0.90"),
    }
    for label, (value, unit, target) in metrics.items():
        v = {name: value(results[name]) for name in PATHS}
        cells = "".join(f"{v[name]:>12.1f}" for name in PATHS)
        print(
            f"{label:<20}{cells} {unit:<6}{v['relay'] / v['direct']:>14.3f}"
            f"{v['relay-copy'] / v['direct']:>13.3f}  {target}"
        )


if __name__ == "__main__":
    sys.exit(main())
