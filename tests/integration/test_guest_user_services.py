"""An image spec's guest side, run on this machine (Unix sockets and TCP on loopback, no VM):
the agent serves user registrars next to its own services (health, reflection, environment),
``agent = false`` leaves only the user's, a failing registrar ends the agent with a traceback
naming it, and the supervisor prefixes, restarts and reports its commands."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vsockrpc import rpc
from vsockrpc.agent import markers
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(90)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kvstore"
sys.path.insert(0, str(EXAMPLE))
from kvstore import kvstore_pb2 as kv_pb  # noqa: E402
from kvstore import kvstore_pb2_grpc as kv_grpc  # noqa: E402

KEYVALUE = "kvstore.v1.KeyValue"


def _agent(tmp_path: Path, config: dict[str, Any], *extra_path: Path) -> subprocess.Popen[str]:
    (tmp_path / "guest.json").write_text(json.dumps(config))
    env = {
        **os.environ,
        "VSOCKRPC_GUEST_CONFIG": str(tmp_path / "guest.json"),
        "PYTHONPATH": os.pathsep.join(str(p) for p in (EXAMPLE, *extra_path)),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "vsockrpc.guest", "--listen", f"unix:{tmp_path / 'a.sock'}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _ready(proc: subprocess.Popen[str]) -> str:
    """The agent's output up to its readiness line."""
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:
        seen += line
        if line.startswith(markers.READY):
            return seen
    raise AssertionError(f"agent exited with {proc.wait(10)} before it was ready")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def _reflected(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return {s.name for s in reply.list_services_response.service}


def test_user_service_is_served_next_to_the_agents_with_health_and_reflection(
    tmp_path: Path,
) -> None:
    config = {
        "agent": True,
        "env": {"KVSTORE_MAX_VALUE": "4"},
        "services": ["kvstore.service:register"],
    }
    with _agent(tmp_path, config) as proc:
        try:
            started = _ready(proc)
            assert f"user service kvstore.service:register: {KEYVALUE}\n" in started
            with rpc.channel(f"unix:{tmp_path / 'a.sock'}") as ch:
                kv = kv_grpc.KeyValueStub(ch)  # type: ignore[no-untyped-call]
                assert kv.Put(kv_pb.PutRequest(key="k", value=b"v"), timeout=10).version == 1
                assert kv.Get(kv_pb.GetRequest(key="k"), timeout=10).value == b"v"
                with pytest.raises(grpc.RpcError) as info:  # the spec's env reached it
                    kv.Put(kv_pb.PutRequest(key="k", value=b"12345"), timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                adder = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
                assert adder.Addition(pb.AdditionRequest(a=2, b=3), timeout=10).c == 5
                health = health_pb2_grpc.HealthStub(ch)
                for name in (KEYVALUE, "popovicu_vsock.VsockService", "vsockrpc.agent.v1.Exec"):
                    status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                    assert status.status == health_pb2.HealthCheckResponse.SERVING, name
                assert {KEYVALUE, "vsockrpc.agent.v1.Exec"} <= _reflected(ch)
        finally:
            _stop(proc)


def test_agent_false_serves_only_the_users_services(tmp_path: Path) -> None:
    config = {"agent": False, "services": ["kvstore.service:register"]}
    with _agent(tmp_path, config) as proc:
        try:
            _ready(proc)
            with rpc.channel(f"unix:{tmp_path / 'a.sock'}") as ch:
                kv = kv_grpc.KeyValueStub(ch)  # type: ignore[no-untyped-call]
                assert kv.Put(kv_pb.PutRequest(key="k", value=b"v"), timeout=10).version == 1
                adder = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.RpcError) as info:
                    adder.Addition(pb.AdditionRequest(a=2, b=3), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
                names = _reflected(ch)
                assert KEYVALUE in names
                assert not any(n.startswith(("vsockrpc.agent", "popovicu")) for n in names)
        finally:
            _stop(proc)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import not_a_module\n", "user service broken.api:register failed to import: "),
        (
            "def register(server):\n    raise RuntimeError('no database')\n",
            "user service broken.api:register raised in register: RuntimeError: no database",
        ),
    ],
)
def test_a_failing_registrar_ends_the_agent_with_a_traceback_naming_it(
    tmp_path: Path, source: str, expected: str
) -> None:
    package = tmp_path / "lib" / "broken"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "api.py").write_text(source)
    config = {"services": ["broken.api:register"]}
    with _agent(tmp_path, config, tmp_path / "lib") as proc:
        assert proc.wait(timeout=30) != 0
        assert proc.stderr is not None
        err = proc.stderr.read()
    assert "Traceback (most recent call last)" in err
    assert expected in err.strip().splitlines()[-1]
    assert markers.READY not in err


SUPERVISE = textwrap.dedent(
    """
    import json, sys
    from vsockrpc.guest.supervise import Supervisor
    from vsockrpc.guest.userconfig import load
    config = load(sys.argv[1])
    sys.exit(Supervisor(config.commands, {"PATH": "/usr/bin:/bin", **dict(config.env)}).run())
    """
)
SERVER = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("listening", os.environ["GREETING"], flush=True)
    conn, _ = s.accept()
    conn.sendall(b"hello\\n")
    conn.close()
    s.accept()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_supervisor_prefixes_output_reports_readiness_and_restarts_per_policy(
    tmp_path: Path,
) -> None:
    port = _free_port()
    (tmp_path / "server.py").write_text(SERVER)
    config = {
        "env": {"GREETING": "from-spec"},
        "commands": [
            {
                "name": "web",
                "argv": [sys.executable, str(tmp_path / "server.py"), str(port)],
                "restart": "never",
                "ready": f"tcp:{port}",
            },
            {
                "name": "flaky",
                "argv": ["/bin/sh", "-c", "echo try; exit 3"],
                "restart": "on-failure",
            },
            {"name": "once", "argv": ["/bin/true"], "restart": "on-failure"},
        ],
    }
    (tmp_path / "guest.json").write_text(json.dumps(config))
    with subprocess.Popen(
        [sys.executable, "-c", SUPERVISE, str(tmp_path / "guest.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        lines: list[str] = []
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                lines.append(proc.stderr.readline())
                text = "".join(lines)
                if "command web ready" in text and text.count("[flaky] try") >= 2:
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=20)
    text = "".join(lines)
    assert code == 0
    assert "[web] listening from-spec" in text
    assert f"vsockrpc-guest: command web ready (tcp:{port})" in text
    assert "vsockrpc-guest: command flaky exited with status 3" in text
    assert "vsockrpc-guest: command flaky: restarting in 0.5 s" in text
    assert text.count("[flaky] try") >= 2
    assert "vsockrpc-guest: command once exited with status 0" in text
    assert "vsockrpc-guest: command once not restarted (restart = on-failure)" in text
