"""`vsockrpc serve` on the host: the agent only with --agent, Unix socket files with an explicit
mode whatever the umask, and agent callers on a Unix socket admitted by uid (SO_PEERCRED).

Tests run as root (the project's test machines do); a second user is ``nobody`` (65534).
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.integration._serve_helpers import (
    CLI,
    NOBODY,
    channel_over,
    cli_server,
    connect_as,
    run_cli,
    shared_dir,
)
from tests.integration._served import agent_registrars
from vsockrpc import rpc, transport
from vsockrpc.addresses import UnixAddress
from vsockrpc.agent.v1 import agent_pb2 as agent_pb
from vsockrpc.agent.v1 import agent_pb2_grpc as agent_grpc
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.services import addition

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def mode_of(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def ping(channel: grpc.Channel) -> agent_pb.PingResponse:
    stub = agent_grpc.SystemStub(channel)  # type: ignore[no-untyped-call]
    reply: agent_pb.PingResponse = stub.Ping(agent_pb.PingRequest(payload=b"hi"), timeout=20)
    return reply


def add(channel: grpc.Channel, a: int, b: int) -> int:
    stub = pb_grpc.VsockServiceStub(channel)  # type: ignore[no-untyped-call]
    reply: pb.AdditionResponse = stub.Addition(pb.AdditionRequest(a=a, b=b), timeout=20)
    return reply.c


@pytest.mark.timeout(60)
def test_library_unix_sockets_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with rpc.serve(
            [addition.register],
            [f"unix:{tmp_path}/native.sock", f"hvsock:{tmp_path}/dev.sock:7"],
        ):
            assert mode_of(tmp_path / "native.sock") == 0o600
            assert mode_of(tmp_path / "dev.sock_7") == 0o600  # hybrid: <path>_<port>
            assert sorted(os.listdir(tmp_path)) == ["dev.sock_7", "native.sock"]
            with rpc.channel(f"unix:{tmp_path}/native.sock") as ch:
                assert add(ch, 5, 7) == 12
        assert os.listdir(tmp_path) == []  # removed at stop, private directories too
        with rpc.serve(
            [addition.register],
            [f"unix:{tmp_path}/relayed.sock"],
            peer_credentials=True,
            unix_mode=0o660,
        ):
            assert mode_of(tmp_path / "relayed.sock") == 0o660
        sock = transport.unix.listen_path(str(tmp_path / "plain.sock"))
        with sock:
            assert mode_of(tmp_path / "plain.sock") == 0o600
    finally:
        os.umask(old)


@pytest.mark.timeout(60)
def test_a_path_too_long_for_the_private_bind_is_relayed_with_its_mode(tmp_path: Path) -> None:
    # The private name (<dir>/.vsockrpc-XXXXXXXX/s) would not fit in sun_path; the target does.
    room = 100 - len(str(tmp_path)) - len("/x/s.sock")
    directory = tmp_path / ("d" * max(room, 1)) / "x"
    directory.mkdir(parents=True)
    path = directory / "s.sock"
    assert len(str(path)) <= 107 < len(str(directory / ".vsockrpc-12345678/s"))
    old = os.umask(0)
    try:
        with rpc.serve([addition.register], [f"unix:{path}"]) as server:
            assert mode_of(path) == 0o600
            with rpc.channel(f"unix:{path}") as ch:
                assert add(ch, 1, 1) == 2
            assert server.addresses == (UnixAddress(str(path)),)
        assert not path.exists()
    finally:
        os.umask(old)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("options", "expected"), [((), 0o600), (("--mode", "0666"), 0o666)])
def test_cli_socket_mode_is_explicit_under_umask_000(
    tmp_path: Path, options: tuple[str, ...], expected: int
) -> None:
    path = tmp_path / "s.sock"
    with cli_server(f"unix:{path}", *options, setup="umask 000"):
        assert mode_of(path) == expected
    with cli_server(f"unix:{path}", "--agent", *options, setup="umask 000"):
        assert mode_of(path) == expected  # the relayed listener too


@pytest.mark.timeout(60)
def test_serve_without_agent_serves_addition_health_and_reflection_only(tmp_path: Path) -> None:
    path = tmp_path / "add.sock"
    with cli_server(f"unix:{path}"), rpc.channel(f"unix:{path}") as ch:
        assert add(ch, 5, 7) == 12
        with pytest.raises(grpc.RpcError) as info:
            ping(ch)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        exec_stub = agent_grpc.ExecStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            exec_stub.ListProcesses(agent_pb.ListProcessesRequest(), timeout=20)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=20).status == 1  # SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="vsockrpc.agent.v1.Exec"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(90)
def test_agent_on_a_unix_socket_refuses_another_uid_and_admits_root(tmp_path: Path) -> None:
    with shared_dir() as shared:
        path = str(shared / "agent.sock")
        # Mode 0666 so that nobody can connect at all: the uid check is what must refuse it.
        with cli_server(f"unix:{path}", "--agent", "--mode", "0666"):
            with channel_over(connect_as(NOBODY, path), tmp_path) as ch:
                assert add(ch, 2, 3) == 5  # Addition is open to whoever reaches the socket
                with pytest.raises(grpc.RpcError) as info:
                    ping(ch)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "uid 65534" in str(info.value.details())
                exec_stub = agent_grpc.ExecStub(ch)  # type: ignore[no-untyped-call]
                events = exec_stub.Exec(
                    iter([agent_pb.ExecRequest(start=agent_pb.ExecStart(argv=[b"id"]))]),
                    timeout=20,
                )
                with pytest.raises(grpc.RpcError) as info:
                    list(events)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with channel_over(connect_as(0, path), tmp_path) as ch:
                assert ping(ch).payload == b"hi"
            with rpc.channel(f"unix:{path}") as ch:  # the server's own user (root here)
                assert ping(ch).payload == b"hi"
        allowing = cli_server(
            f"unix:{path}", "--agent", "--mode", "0666", "--allow-uid", str(NOBODY)
        )
        with allowing, channel_over(connect_as(NOBODY, path), tmp_path) as ch:
            assert ping(ch).payload == b"hi"
        # The default mode keeps other users from even connecting.
        with cli_server(f"unix:{path}", "--agent"), pytest.raises(PermissionError):
            connect_as(NOBODY, path)


@pytest.mark.timeout(60)
def test_library_agent_on_unix_checks_uid_when_credentials_are_conveyed(tmp_path: Path) -> None:
    with shared_dir() as shared:
        path = str(shared / "agent.sock")
        with rpc.serve(
            agent_registrars(), [f"unix:{path}"], peer_credentials=True, unix_mode=0o666
        ):
            with channel_over(connect_as(NOBODY, path), tmp_path) as ch:
                with pytest.raises(grpc.RpcError) as info:
                    ping(ch)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with rpc.channel(f"unix:{path}") as ch:
                assert ping(ch).payload == b"hi"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "999"], "'999' is not an octal mode"),
        (["--mode", "01777"], "'01777' is not a permission mode"),
        (["--allow-uid", "0"], "--allow-uid needs --agent"),
        (["--agent", "--allow-uid", "no-such-user-x"], "neither a uid nor a user name"),
    ],
)
def test_serve_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("serve", "--listen", f"unix:{tmp_path}/x.sock", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.timeout(60)
def test_serve_help_says_what_it_serves() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Serve the Addition service" in text
    assert "--agent" in text and "--access-log" in text and "--mode" in text
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert "serve Addition (--agent: and the guest agent)" in " ".join(top.stdout.split())
