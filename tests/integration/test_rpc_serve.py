"""``rpc.serve`` / ``rpc.channel`` API: bound addresses, vsock listen via the relay, cleanup."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests import host
from vsockrpc import rpc, transport
from vsockrpc.addresses import VMADDR_CID_ANY, TcpAddress, UnixAddress, VsockAddress
from vsockrpc.errors import AddressError, BadInputError, TransportError, TransportTimeout
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.services import addition


@pytest.fixture(autouse=True)
def _own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Private relay directories go to a fresh, short temp dir: other processes' don't count
    (after pytest made ``tmp_path``, which must not land there)."""
    base = tempfile.mkdtemp(prefix="t", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", base)
    yield
    monkeypatch.undo()
    shutil.rmtree(base)


def _private_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "vsockrpc-*")))


def _add(ch: grpc.Channel) -> int:
    stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
    reply: pb.AdditionResponse = stub.Addition(pb.AdditionRequest(a=5, b=7), timeout=10)
    return reply.c


@pytest.mark.timeout(30)
def test_addresses_report_real_ports(tmp_path: Path) -> None:
    with rpc.serve([addition.register], ["tcp:127.0.0.1:0", f"unix:{tmp_path}/a.sock"]) as server:
        tcp, unix = server.addresses
        assert isinstance(tcp, TcpAddress) and tcp.host == "127.0.0.1" and tcp.port > 0
        assert unix == UnixAddress(f"{tmp_path}/a.sock")
        for address in server.addresses:
            with rpc.channel(address) as ch:
                assert _add(ch) == 12


@pytest.mark.timeout(30)
@pytest.mark.skipif(not host.AF_VSOCK, reason=host.AF_VSOCK_MISSING)
def test_serve_on_vsock_listens_through_the_relay() -> None:
    # Listening only: nothing here connects AF_VSOCK (the safety rule). A failed listen is the
    # regression this test exists for: it fails, it does not skip.
    before = _private_dirs()
    with rpc.serve([addition.register], ["vsock:-1:0"]) as server:
        (address,) = server.addresses
        assert isinstance(address, VsockAddress)
        assert address.cid == VMADDR_CID_ANY and address.port not in (0, 0xFFFFFFFF)
        assert len(_private_dirs() - before) == 1  # grpcio's private Unix socket lives there
        with pytest.raises(TransportError):  # the port is really taken
            transport.listen(address).close()
    assert _private_dirs() - before == set()


@pytest.mark.timeout(30)
def test_failed_bind_leaves_nothing_behind(tmp_path: Path) -> None:
    before = _private_dirs()
    taken = transport.listen("tcp:127.0.0.1:0")
    with taken:
        port = taken.getsockname()[1]
        with pytest.raises(TransportError, match="cannot listen"):
            rpc.serve([addition.register], [f"hvsock:{tmp_path}/d.sock:7", f"127.0.0.1:{port}"])
    assert _private_dirs() - before == set()
    assert not os.path.exists(f"{tmp_path}/d.sock_7")


@pytest.mark.timeout(30)
def test_serve_needs_an_address() -> None:
    with pytest.raises(AddressError):
        rpc.serve([addition.register], [])
    with pytest.raises(AddressError):
        rpc.serve([addition.register], ["nonsense"])
    for workers in (0, -3, True, 2.5):
        with pytest.raises(BadInputError, match="max_workers must be a whole number"):
            rpc.serve([addition.register], ["unix:/nonexistent/x.sock"], max_workers=workers)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_stop_is_idempotent_and_cleans_up(tmp_path: Path) -> None:
    before = _private_dirs()
    server = rpc.serve([addition.register], [f"hvsock:{tmp_path}/d.sock:7"])
    assert server.wait_for_termination(timeout=0.05) is True  # still running: timed out
    server.stop(grace=1)
    server.stop()
    assert server.wait_for_termination(timeout=5) is False
    assert _private_dirs() - before == set()


@pytest.mark.timeout(30)
def test_channel_close_removes_its_relay(tmp_path: Path) -> None:
    before = _private_dirs()
    ch = rpc.channel(f"hvsock:{tmp_path}/absent.sock:1")
    assert isinstance(ch, rpc.RelayChannel)
    assert len(_private_dirs() - before) == 1
    ch.close()
    assert _private_dirs() - before == set()


@pytest.mark.timeout(30)
def test_channel_without_relay_refuses_what_grpcio_cannot_dial() -> None:
    if rpc.native_vsock_supported():
        pytest.skip("grpcio dials vsock natively here")
    with pytest.raises(TransportError, match="without the relay"):
        rpc.channel("vsock:3:9999", relay=False)


@pytest.mark.timeout(30)
def test_wait_until_ready_times_out_with_transport_timeout(tmp_path: Path) -> None:
    with pytest.raises(TransportTimeout, match=r"not ready after 0\.5 s: .*No such file"):
        rpc.wait_until_ready(f"unix:{tmp_path}/nobody.sock", timeout=0.5)
    # Something accepts, but it isn't gRPC: said so.
    with (
        transport.listen(f"unix:{tmp_path}/mute.sock"),
        pytest.raises(TransportTimeout, match="no gRPC server answered"),
    ):
        rpc.wait_until_ready(f"unix:{tmp_path}/mute.sock", timeout=0.5)


# ---- unix:// URIs and grpc core's own log lines ----------------------------------------------

CLI = [sys.executable, "-m", "vsockrpc.cli.main"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args",
    [
        ["add", "5", "7", "--target", "unix://tmp/x.sock"],
        ["add", "5", "7", "--target", "unix://relative"],
        ["serve", "--listen", "unix://tmp/x"],
    ],
)
def test_unix_uri_with_an_authority_is_a_usage_error(args: list[str]) -> None:
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=25, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()[-1:]
    assert args[-1] in line and "unix:///abs/path" in line, result.stderr
    assert "E1201" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_unix_uri_with_an_absolute_path_works(tmp_path: Path) -> None:
    path = f"{tmp_path}/uri.sock"
    with rpc.serve([addition.register], [f"unix://{path}"]) as server:
        assert server.addresses == (UnixAddress(path),)
        with rpc.channel(f"unix://{path}") as ch:
            assert _add(ch) == 12


_GRPC_CORE_ERROR = r"""
import vsockrpc.rpc  # as the CLI and SDK do: vsockrpc first (grpc reads its log level on import)
import grpc
ch = grpc.insecure_channel("unix://tmp/x.sock")  # grpc core logs E... lines for this one
try:
    grpc.channel_ready_future(ch).result(timeout=0.5)
except grpc.FutureTimeoutError:
    print("timed out")
"""


@pytest.mark.timeout(60)
def test_grpc_core_log_lines_stay_off_the_terminal_by_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _GRPC_CORE_ERROR],
            capture_output=True,
            text=True,
            timeout=50,
            check=False,
            env={**env, **extra},
        )

    quiet = run()
    assert (quiet.stdout, quiet.stderr) == ("timed out\n", "")
    # An explicit choice is left alone (and shows the test provokes real log lines).
    loud = run(GRPC_VERBOSITY="ERROR")
    assert "authority-based URIs not supported" in loud.stderr
