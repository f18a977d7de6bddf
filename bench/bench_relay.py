#!/usr/bin/env python3
"""Relay overhead: grpcio through one relay hop vs grpcio straight on a Unix socket.

A server process (this script with ``--server``) serves Addition and a byte-stream service on a
Unix socket. In this process, two channels reach it: ``direct`` (grpcio dials the Unix socket)
and ``relay`` (``vsockrpc.rpc.channel(..., relay=True)``: grpcio dials the relay's private
socket and the relay forwards to the server's socket, as it forwards to vsock/hybrid sockets
where those can be connected). Rounds alternate between the two so drift hits both alike.

Reports unary Addition latency (p50/p99 over --calls calls each) and 64 MiB streaming
throughput in both directions, with relay/direct ratios. Targets: latency ratio <= 1.15,
throughput ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc

from vsockrpc import rpc
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.services import addition

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


def measure(path: str, calls: int, rounds: int, size: int) -> Results:
    results: Results = {name: {"lat": [], "down": [], "up": []} for name in ("direct", "relay")}
    target = f"unix:{path}"
    with rpc.channel(target) as direct, rpc.channel(target, relay=True) as relayed:
        channels = {"direct": direct, "relay": relayed}
        stubs = {name: pb_grpc.VsockServiceStub(ch) for name, ch in channels.items()}  # type: ignore[no-untyped-call]
        for name, ch in channels.items():  # warm up: connect, first-call costs
            unary_round(stubs[name], 200, [])
            download(ch, CHUNK * 4)
        # Unary: alternate call by call, so load from elsewhere on the machine hits both alike.
        requests = {name: (stubs[name], pb.AdditionRequest(a=5, b=7)) for name in channels}
        for i in range(calls * 2):
            name = "direct" if (i // 2 + i) % 2 == 0 else "relay"
            stub, request = requests[name]
            start = time.perf_counter()
            stub.Addition(request, timeout=10)
            results[name]["lat"].append(time.perf_counter() - start)
        for i in range(rounds):
            order = ("direct", "relay") if i % 2 == 0 else ("relay", "direct")
            for name in order:
                results[name]["down"].append(download(channels[name], size))
                results[name]["up"].append(upload(channels[name], size))
    return results


def report(results: Results, args: argparse.Namespace) -> None:
    def row(label: str, direct: float, relay: float, unit: str, target: str) -> None:
        ratio = relay / direct
        print(f"{label:<24}{direct:>12.1f}{relay:>12.1f} {unit:<7}{ratio:>8.3f}  {target}")

    d, r = results["direct"], results["relay"]
    print(
        f"relay benchmark: {len(d['lat'])} unary calls per path, {args.mib} MiB x "
        f"{len(d['down'])} transfers per direction, interleaved; python {sys.version.split()[0]}, "
        f"grpcio {grpc.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"{'':<24}{'direct':>12}{'relay':>12} {'unit':<7}{'ratio':>8}  target")
    us = 1e6
    row(
        "unary p50",
        _percentile(d["lat"], 0.5) * us,
        _percentile(r["lat"], 0.5) * us,
        "us",
        "<= 1.15",
    )
    row(
        "unary p99",
        _percentile(d["lat"], 0.99) * us,
        _percentile(r["lat"], 0.99) * us,
        "us",
        "<= 1.15",
    )
    mib = 1024 * 1024
    row(
        "download (median)",
        statistics.median(d["down"]) / mib,
        statistics.median(r["down"]) / mib,
        "MiB/s",
        ">= 0.90",
    )
    row(
        "upload (median)",
        statistics.median(d["up"]) / mib,
        statistics.median(r["up"]) / mib,
        "MiB/s",
        ">= 0.90",
    )


if __name__ == "__main__":
    sys.exit(main())
