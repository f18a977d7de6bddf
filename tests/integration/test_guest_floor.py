"""The boot bench's floor (vsockrpc.guest.floor): a bare grpcio server that imports nothing of
vsockrpc, loaded by path as the image's floor init loads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import vsockrpc.guest.floor as floor_module
from vsockrpc.agent import markers
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

FLOOR = Path(floor_module.__file__)
LOAD_AND_SERVE = """
import sys
from importlib.util import module_from_spec, spec_from_file_location
spec = spec_from_file_location("vsockrpc_floor", sys.argv[1])
floor = module_from_spec(spec)
spec.loader.exec_module(floor)
server = floor.serve("unix:" + sys.argv[2])
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "vsockrpc")
print("serving; vsockrpc modules:", loaded, "asyncio" in sys.modules, flush=True)
sys.stdin.read()
server.stop(None)
"""


def test_floor_repeats_the_console_markers_the_launcher_times() -> None:
    assert floor_module.INIT_STARTED == markers.INIT_STARTED
    assert floor_module.READY == markers.READY


@pytest.mark.timeout(60)
def test_floor_answers_addition_without_importing_vsockrpc(tmp_path: Path) -> None:
    sock = tmp_path / "floor.sock"
    with subprocess.Popen(
        [sys.executable, "-I", "-c", LOAD_AND_SERVE, str(FLOOR), str(sock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline()
            # nothing of vsockrpc, and asyncio only behind the stand-in until something uses it
            assert line == "serving; vsockrpc modules: [] False\n"
            with grpc.insecure_channel(f"unix:{sock}") as channel:
                stub = pb_grpc.VsockServiceStub(channel)  # type: ignore[no-untyped-call]
                assert stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=30).c == 12
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
