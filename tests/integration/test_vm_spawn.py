"""Starting QEMU from a process with busy gRPC threads (the launcher after using a guest).

A ``preexec_fn`` made CPython fork() and run grpcio's at-fork handlers in the child, which
aborted it before exec about once in 40 starts: ``QEMU exited at once (status -6): no message``
for a restored clone. The child now gets PDEATHSIG from ``setpriv``; these tests start
``/bin/true`` and ``sleep`` the way the launcher starts QEMU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vsockrpc.vm.procs import detached_or_own_group

pytestmark = pytest.mark.timeout(120)

STARTS = 300


@pytest.fixture
def busy_grpc() -> Iterator[None]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def calls() -> None:
        while not stop.is_set():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(20):
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

    threads = [threading.Thread(target=calls, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        server.stop(None)


def test_children_reach_exec_while_grpc_threads_are_busy(busy_grpc: None) -> None:
    codes: dict[int, int] = {}
    for _ in range(STARTS):
        child = subprocess.Popen(
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **detached_or_own_group(["/bin/true"], False),
        )
        code = child.wait(timeout=30)
        codes[code] = codes.get(code, 0) + 1
    assert codes == {0: STARTS}, f"exit codes of {STARTS} starts: {codes}"


LAUNCHER = """
import subprocess, sys, time
from vsockrpc.vm.procs import detached_or_own_group
child = subprocess.Popen(**detached_or_own_group(["sleep", "600"], False))
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_foreground_child_dies_with_its_launcher_even_by_sigkill(tmp_path: Path) -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        pid = int(launcher.stdout.readline())
        deadline = time.monotonic() + 10  # setpriv, then sh, then the program: same pid
        while time.monotonic() < deadline:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]
            if cmdline == [b"sleep", b"600"]:
                break
            time.sleep(0.05)
        assert cmdline == [b"sleep", b"600"]
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its SIGKILLed launcher")
