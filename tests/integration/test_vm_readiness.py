"""The launcher's wait for a guest's gRPC server (``vm.readiness.wait_answer``), against real
grpcio servers on Unix sockets: late start, no health service, nobody at all, a stop request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from vsockrpc.addresses import parse_address
from vsockrpc.errors import TransportTimeout
from vsockrpc.vm.readiness import wait_answer

pytestmark = pytest.mark.timeout(60)


def _server(path: Path, *, with_health: bool) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    if with_health:
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    return server


@pytest.fixture
def thread_errors() -> Iterator[list[threading.ExceptHookArgs]]:
    """Exceptions raised in any thread meanwhile (e.g. a connectivity poller on a closed
    channel); the test asserts there are none."""
    seen: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = seen.append
    try:
        yield seen
    finally:
        threading.excepthook = previous


@pytest.mark.parametrize("with_health", [True, False])
def test_a_server_that_starts_late_is_waited_for(
    tmp_path: Path, with_health: bool, thread_errors: list[threading.ExceptHookArgs]
) -> None:
    """Any answer counts: a server without health checking answers UNIMPLEMENTED."""
    path = tmp_path / "agent.sock"
    servers: list[grpc.Server] = []
    starter = threading.Timer(1.5, lambda: servers.append(_server(path, with_health=with_health)))
    starter.start()
    try:
        start = time.monotonic()
        wait_answer(parse_address(f"unix:{path}"), time.monotonic() + 30, cancel=None)
        assert 1.5 <= time.monotonic() - start < 25
    finally:
        starter.join()
        for server in servers:
            server.stop(None)
    time.sleep(0.5)  # a poller left behind would fail by now
    assert not thread_errors


def test_nobody_answering_times_out_at_the_deadline(
    tmp_path: Path, thread_errors: list[threading.ExceptHookArgs]
) -> None:
    address = parse_address(f"unix:{tmp_path / 'nobody.sock'}")
    start = time.monotonic()
    with pytest.raises(TransportTimeout, match="not ready"):
        wait_answer(address, time.monotonic() + 2, cancel=None)
    assert 2 <= time.monotonic() - start < 10
    assert not thread_errors


def test_a_stop_request_and_a_dead_guest_cut_the_wait_short(tmp_path: Path) -> None:
    address = parse_address(f"unix:{tmp_path / 'nobody.sock'}")
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        wait_answer(address, time.monotonic() + 30, cancel=cancel)
    assert time.monotonic() - start < 5

    def dead() -> None:
        raise RuntimeError("QEMU exited")

    with pytest.raises(RuntimeError, match="QEMU exited"):
        wait_answer(address, time.monotonic() + 30, cancel=None, check=dead)
