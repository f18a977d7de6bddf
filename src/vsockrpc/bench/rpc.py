"""``rpc`` part: what ``vsockrpc serve`` costs per unary call.

Three servers of the seed's Addition service on Unix sockets, each in its own process:
``vsockrpc serve`` (the real command), a bare grpcio server with the same servicer and nothing
else, and — where g++ and Debian's grpc++ are installed — a C++ grpc++ server (``cpp/``), the
reference line. The same clients call all of them, rotating call by call: a grpcio client in this
process, and the C++ client (a process per round) when it could be built.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import grpc

from vsockrpc.bench import _cpp, _model
from vsockrpc.bench._context import Context, bench_server, server_process
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

NAME = "rpc"
TITLE = "per-call cost of `vsockrpc serve` vs a bare grpcio server and a C++ server"
SERVE = "vsockrpc serve"
BARE = "bare grpcio"
CPP = "C++ grpc++"


def run(ctx: Context) -> _model.PartResult:
    # The C++ client's rounds are processes: a round's latency depends on where the scheduler
    # put it (per-round medians of one server fell into two groups, ~265 and ~330 µs, in 3
    # runs of 5 rounds), so 15 short rounds, rotating, average that out.
    calls, rounds = (300, 2) if ctx.quick else (3000, 15)
    notes: list[str] = []
    cpp_missing = _cpp.missing()
    binaries = None
    if cpp_missing is None:
        binaries = _cpp.build(lambda line: ctx.step(NAME, line))
        notes.append(f"C++ reference: {_cpp.toolchain()}, -O2")
    else:
        notes.append(f"no C++ reference line: {cpp_missing}")
    paths = {name: str(ctx.workdir / f"rpc-{i}.sock") for i, name in enumerate((SERVE, BARE, CPP))}
    servers = {
        SERVE: [
            sys.executable,
            "-m",
            "vsockrpc.cli.main",
            "serve",
            "--listen",
            f"unix:{paths[SERVE]}",
        ],
        BARE: bench_server("grpcio", paths[BARE]),
    }
    if binaries is not None:
        servers[CPP] = [str(binaries[0]), f"unix:{paths[CPP]}"]
    names = list(servers)
    py_lat: dict[str, list[float]] = {n: [] for n in names}
    cpp_lat: dict[str, list[float]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        ctx.step(NAME, f"starting {len(servers)} servers: {', '.join(names)}")
        for name, argv in servers.items():
            stack.enter_context(server_process(argv, paths[name], name))
        stubs = {}
        for name in names:
            ch = stack.enter_context(grpc.insecure_channel(f"unix:{paths[name]}"))
            stubs[name] = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
        request = pb.AdditionRequest(a=5, b=7)
        for name in names:
            for _ in range(min(200, calls)):
                stubs[name].Addition(request, timeout=10)
        ctx.step(NAME, f"grpcio client: {calls} calls per server, rotating")
        for i in range(calls):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                start = time.perf_counter()
                reply = stubs[name].Addition(request, timeout=10)
                py_lat[name].append(time.perf_counter() - start)
                if reply.c != 12:
                    raise RuntimeError(f"{name}: Addition(5, 7) = {reply.c}")
        if binaries is not None:
            per_round = calls // rounds
            for r in range(rounds):
                ctx.step(NAME, f"C++ client: {per_round} calls per server, round {r + 1}")
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    cpp_lat[name] += _cpp_client(binaries[1], paths[name], per_round)
    pairs = [[SERVE, CPP], [SERVE, BARE], [BARE, CPP]]
    baseline = CPP if binaries is not None else BARE
    figures = [
        _model.figure(
            f"{NAME}.python-client",
            "unary Addition round trip, grpcio (Python) client",
            "latency",
            py_lat,
            baseline=baseline,
            pairs=pairs,
        )
    ]
    if binaries is not None:
        figures.append(
            _model.figure(
                f"{NAME}.cpp-client",
                "unary Addition round trip, C++ client",
                "latency",
                cpp_lat,
                baseline=baseline,
                pairs=pairs,
            )
        )
    return _model.part_result(
        NAME,
        TITLE,
        {"guest": "none (host only)", "transport": "Unix stream sockets"},
        figures,
        notes=[
            "vsockrpc serve runs as users start it: Addition with health and reflection, "
            "no access log (--access-log off), 16 workers; bare grpcio: the same Addition "
            "servicer alone",
            *notes,
        ],
    )


def _cpp_client(client: object, path: str, calls: int) -> list[float]:
    done = subprocess.run(
        [str(client), f"unix:{path}", "200", str(calls)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the C++ client failed: {done.stderr.strip()[-300:]}")
    return [int(line) / 1e9 for line in done.stdout.split()]
