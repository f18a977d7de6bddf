#!/usr/bin/env python3
"""What ``vsockrpc serve`` adds per unary call, counted rather than timed.

Starts, in this process, the server ``vsockrpc serve`` runs (:func:`vsockrpc.rpc.serve` with
Addition, health and reflection, no access log) and then a bare grpcio server with the same
Addition servicer, and counts the Python function calls each server's threads make while a
client process (grpcio, its own interpreter) calls Addition N times. Equal counts mean vsockrpc
adds no Python work per call: what is left is grpcio's own per-call path (the floor of the
``rpc`` part's ratio to the C++ server). A count does not move with the machine's load.

    bench/rpc_python_calls.py [N] [--top K]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from types import FrameType
from typing import Any

import grpc

from vsockrpc import rpc
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.services import addition_services
from vsockrpc.services.addition import AdditionServicer

CLIENT = r"""
import sys, grpc
from vsockrpc.proto import vsock_service_pb2 as pb, vsock_service_pb2_grpc as pb_grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    stub = pb_grpc.VsockServiceStub(ch)
    for _ in range(int(sys.argv[2])):
        assert stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=10).c == 12
"""

Key = tuple[str, str]


class Counter:
    """A profile function for every thread started after :meth:`install`; counts calls while on."""

    def __init__(self) -> None:
        self.on = False
        self.calls: collections.Counter[Key] = collections.Counter()

    def __call__(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call" and self.on:
            code = frame.f_code
            where = "/".join(code.co_filename.split("/")[-2:])  # e.g. grpc/_server.py
            self.calls[(where, code.co_name)] += 1


@contextlib.contextmanager
def serve_kind(kind: str, path: str) -> Iterator[None]:
    if kind == "vsockrpc serve":
        with rpc.serve(addition_services(), [f"unix:{path}"]):
            yield
        return
    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_VsockServiceServicer_to_server(AdditionServicer(), bare)  # type: ignore[no-untyped-call]
    bare.add_insecure_port(f"unix:{path}")
    bare.start()
    try:
        yield
    finally:
        bare.stop(None).wait()


def count(kind: str, path: str, calls: int) -> collections.Counter[Key]:
    counter = Counter()
    profile: Callable[..., Any] = counter
    threading.setprofile(profile)  # the server's threads start below: they inherit it
    try:
        with serve_kind(kind, path):
            client = [sys.executable, "-c", CLIENT, f"unix:{path}"]
            subprocess.run([*client, "200"], check=True, timeout=300)  # threads up, warm
            counter.on = True
            subprocess.run([*client, str(calls)], check=True, timeout=600)
            counter.on = False
    finally:
        threading.setprofile(None)
    return counter.calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", nargs="?", type=int, default=2000)
    parser.add_argument("--top", type=int, default=10, help="functions to list for each server")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error(f"N must be a positive number of calls, not {args.calls}")
    workdir = tempfile.mkdtemp(prefix="vsockrpc-calls-")
    try:
        for i, kind in enumerate(("vsockrpc serve", "bare grpcio")):
            calls = count(kind, f"{workdir}/server-{i}.sock", args.calls)
            print(f"{kind}: {sum(calls.values()) / args.calls:.1f} Python calls per unary call")
            for (where, name), n in calls.most_common(args.top):
                print(f"  {n / args.calls:6.2f}  {name}  ({where})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
