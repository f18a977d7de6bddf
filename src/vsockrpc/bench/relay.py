"""``relay`` part: grpcio through vsockrpc's relay hop vs grpcio straight on a Unix socket.

A server process (:mod:`vsockrpc.bench._servers` ``stream``) serves Addition and a byte-stream
service on a Unix socket. Three channels reach it: ``direct`` (grpcio dials the socket),
``relay`` (``rpc.channel(..., relay=True)``: grpcio dials the relay's private socket and the
relay forwards with splice(2), as it forwards to vsock/hybrid sockets), ``relay-copy`` (the
same relay copying through a buffer: the design alternative) and, where g++ is installed,
``relay-C++`` (the same hop in C++, ``cpp/splice_relay.cc``: the floor of any relay, since it
has no interpreter in it). Calls and transfers rotate among them so drift from other load hits
all alike.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import grpc

from vsockrpc import rpc
from vsockrpc.bench import _cpp, _model
from vsockrpc.bench._context import Context, bench_server, server_process
from vsockrpc.bench._private import Relay
from vsockrpc.bench._servers import CHUNK, STREAM_SERVICE
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.transport import unix

NAME = "relay"
TITLE = "the grpcio relay hop vs a direct Unix socket"
PATHS = ("direct", "relay", "relay-copy")
CPP_RELAY = "relay-C++"
STREAM = f"/{STREAM_SERVICE}/"


def download(ch: grpc.Channel, size: int) -> float:
    """MB/s of one streamed download of ``size`` bytes."""
    start = time.perf_counter()
    got = sum(len(c) for c in ch.unary_stream(STREAM + "Download")(str(size).encode(), timeout=120))
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"download: {got} of {size} bytes")
    return size / elapsed / 1e6


def upload(ch: grpc.Channel, size: int) -> float:
    block = b"\xa5" * CHUNK

    def chunks() -> Iterator[bytes]:
        for offset in range(0, size, CHUNK):
            yield block[: min(CHUNK, size - offset)]

    start = time.perf_counter()
    got = int(ch.stream_unary(STREAM + "Upload")(chunks(), timeout=120))
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"upload: {got} of {size} bytes")
    return size / elapsed / 1e6


@contextlib.contextmanager
def copying_relay_channel(path: str, front: str) -> Iterator[grpc.Channel]:
    """Like ``rpc.channel(..., relay=True)`` but the relay copies through a buffer
    (recv_into + sendall) instead of splice(2)."""

    def dial(_conn: socket.socket, _peer: object) -> socket.socket:
        return unix.connect_path(path)

    with (
        Relay(unix.listen_path(front), dial, name="copy", splice=False) as forwarder,
        grpc.insecure_channel(f"unix:{front}") as ch,
    ):
        yield ch
        forwarder.stop_accepting()


def run(ctx: Context) -> _model.PartResult:
    calls, rounds, mib = (300, 2, 8) if ctx.quick else (5000, 6, 64)
    size = mib << 20
    path = str(ctx.workdir / "relay-server.sock")
    notes: list[str] = []
    cpp_relay = _cpp.optional_reference(
        _cpp.build_relay, CPP_RELAY, lambda line: ctx.step(NAME, line), notes
    )
    paths = PATHS if cpp_relay is None else (*PATHS, CPP_RELAY)
    lat: dict[str, list[float]] = {p: [] for p in paths}
    down: dict[str, list[float]] = {p: [] for p in paths}
    up: dict[str, list[float]] = {p: [] for p in paths}
    ctx.step(NAME, "starting the server process")
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            server_process(bench_server("stream", path), path, "the relay bench server")
        )
        channels = {
            "direct": stack.enter_context(rpc.channel(f"unix:{path}")),
            "relay": stack.enter_context(rpc.channel(f"unix:{path}", relay=True)),
            "relay-copy": stack.enter_context(
                copying_relay_channel(path, str(ctx.workdir / "copy-relay.sock"))
            ),
        }
        if cpp_relay is not None:
            front = str(ctx.workdir / "cpp-relay.sock")
            stack.enter_context(server_process([str(cpp_relay), front, path], front, CPP_RELAY))
            channels[CPP_RELAY] = stack.enter_context(grpc.insecure_channel(f"unix:{front}"))
        stubs = {n: pb_grpc.VsockServiceStub(ch) for n, ch in channels.items()}  # type: ignore[no-untyped-call]
        request = pb.AdditionRequest(a=5, b=7)
        for name, ch in channels.items():  # warm up: connect, first-call costs
            for _ in range(min(200, calls)):
                stubs[name].Addition(request, timeout=10)
            download(ch, 4 * CHUNK)
        ctx.step(NAME, f"{calls} unary Addition calls per path, rotating {', '.join(paths)}")
        for i in range(calls):
            k = i % len(paths)
            for name in paths[k:] + paths[:k]:
                start = time.perf_counter()
                stubs[name].Addition(request, timeout=10)
                lat[name].append(time.perf_counter() - start)
        for i in range(rounds):
            ctx.step(NAME, f"streamed {mib} MiB each way per path, round {i + 1} of {rounds}")
            k = i % len(paths)
            for name in paths[k:] + paths[:k]:
                down[name].append(download(channels[name], size))
                up[name].append(upload(channels[name], size))
    figures = [
        _model.figure(f"{NAME}.unary", "unary Addition round trip", "latency", lat),
        _model.figure(
            f"{NAME}.download", f"streamed download, {mib} MiB", "rate", down, unit="MB/s"
        ),
        _model.figure(f"{NAME}.upload", f"streamed upload, {mib} MiB", "rate", up, unit="MB/s"),
    ]
    return _model.part_result(
        NAME,
        TITLE,
        {"guest": "none (host only)", "transport": "Unix stream sockets", "client": "grpcio"},
        figures,
        notes=[
            "relay = vsockrpc's relay (splice); relay-copy = the same relay copying through a "
            "buffer; relay-C++ = the same splice hop in C++ (no Python: the floor of a relay hop)",
            "server: vsockrpc.rpc.serve in its own process; client: the bench process (the "
            "Python relays run in it too, as rpc.channel runs them; relay-C++ in its own process)",
            *notes,
        ],
    )
