"""``vsockrpc forward``: forwards until a signal, one line and exit 1 for a port in use, exit 2
for bad input, and its Unix sockets removed when it stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._relay_helpers import HybridPeer
from tests.integration.test_forward import EchoServer, exchange

CLI = [sys.executable, "-m", "vsockrpc.cli.main"]


@pytest.fixture
def device(tmp_path: Path) -> Iterator[HybridPeer]:
    guest = EchoServer(str(tmp_path / "guest80.sock"))
    try:
        with HybridPeer(str(tmp_path / "vm.vsock"), {80: guest.path}) as peer:
            yield peer
    finally:
        guest.close()


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "forward", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, err


@pytest.mark.timeout(60)
def test_forwards_tcp_and_unix_until_sigterm_or_sighup(device: HybridPeer, tmp_path: Path) -> None:
    web = tmp_path / "web.sock"
    agent = f"hvsock:{device.path}:9999"
    proc = _start(agent, "--listen", "tcp:127.0.0.1:0", "--to", "80")
    proc2 = _start(agent, "--listen", f"unix:{web}", "--to", "80", "--mode", "660")
    try:
        assert proc.stdout is not None and proc2.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("forwarding tcp:127.0.0.1:") and line.endswith(
            " -> guest port 80\n"
        ), line
        port = int(line.split()[1].rsplit(":", 1)[1])
        assert proc2.stdout.readline() == f"forwarding unix:{web} -> guest port 80\n"
        assert oct(web.stat().st_mode & 0o777) == oct(0o660)
        assert exchange(("127.0.0.1", port), b"tcp") == b"tcp"
        assert exchange(str(web), b"unix") == b"unix"
    finally:
        code, err = _stop(proc)
        code2, _ = _stop(proc2, signal.SIGHUP)
    assert (code, code2) == (0, 0), err
    assert not web.exists()


@pytest.mark.timeout(60)
def test_a_host_port_in_use_is_one_line_and_exit_1(device: HybridPeer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = ["--listen", f"tcp:127.0.0.1:{port}", "--to", "80"]
        result = subprocess.run(
            [*CLI, "forward", f"hvsock:{device.path}:9999", *listen],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"vsockrpc: error: cannot listen on tcp:127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "tcp:127.0.0.1:0", "--to", "0"], "bad port '0'"),
        (["--listen", "tcp:127.0.0.1:0", "--to", "http"], "bad port 'http'"),
        (["--listen", "tcp:127.0.0.1:0", "--to", "4294967295"], "bad port '4294967295'"),
        (["--listen", "tcp:127.0.0.1:99999", "--to", "80"], "port 99999 out of range"),
        (["--listen", "tcp:127.0.0.1:0"], "one --to PORT for each --listen"),
        (["--listen", "tcp:127.0.0.1:0", "--to", "80", "--mode", "9"], "bad mode '9'"),
        (["--expose", "unix:{tmp}/missing.sock", "--as", "5000"], "missing.sock: no such"),
        (["--expose", "unix:{tmp}/guest80.sock"], "one --as PORT for each --expose"),
        ([], "nothing to forward"),
        (
            ["--listen", "tcp:127.0.0.1:0", "--to", "80", "--connect-timeout", "0"],
            "argument --connect-timeout: '0' is not a number of seconds (more than 0)",
        ),
        (
            ["--listen", "tcp:127.0.0.1:0", "--to", "80", "--connect-timeout", "inf"],
            "argument --connect-timeout: 'inf' is not a number of seconds",
        ),
    ],
)
def test_bad_input_is_a_usage_error(
    device: HybridPeer, tmp_path: Path, args: list[str], message: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run(
        [*CLI, "forward", f"hvsock:{device.path}:9999", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_bad_agent_address_is_a_usage_error() -> None:
    result = subprocess.run(
        [*CLI, "forward", "hvsock:nowhere", "--listen", "tcp:127.0.0.1:0", "--to", "80"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "missing port in 'hvsock:nowhere'" in result.stderr


@pytest.mark.timeout(60)
def test_expose_until_sigterm(tmp_path: Path) -> None:
    app = EchoServer(str(tmp_path / "app.sock"))
    try:
        proc = _start(
            f"hvsock:{tmp_path}/vm.vsock:9999", "--expose", f"unix:{app.path}", "--as", "5000"
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == f"forwarding guest CID 2 port 5000 -> unix:{app.path}\n"
            assert exchange(f"{tmp_path}/vm.vsock_5000", b"to the host") == b"to the host"
        finally:
            code, err = _stop(proc)
        assert code == 0, err
        assert not os.path.exists(f"{tmp_path}/vm.vsock_5000")
    finally:
        app.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expose", "unix:{tmp}/missing.sock:5000"], "missing.sock: no such socket file"),
        (["--expose", "unix:{tmp}/app.sock"], "expected ADDRESS:PORT"),
        (["--expose", "unix:{tmp}/app.sock:0"], "bad port '0'"),
        (
            ["--detach", "--expose", "unix:{tmp}/app.sock:5000"],
            "--expose cannot be used with --detach",
        ),
    ],
)
def test_vm_run_expose_bad_input_is_a_usage_error_before_any_build(
    tmp_path: Path, args: list[str], message: str
) -> None:
    app = EchoServer(str(tmp_path / "app.sock"))
    try:
        argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
        result = subprocess.run(
            [*CLI, "vm", "run", "--image", str(tmp_path / "no-image"), *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        app.close()
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_expose_needs_a_hybrid_address(tmp_path: Path) -> None:
    app = EchoServer(str(tmp_path / "app.sock"))
    try:
        result = subprocess.run(
            [*CLI, "forward", "vsock:3:9999", "--expose", f"unix:{app.path}", "--as", "5000"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        app.close()
    assert result.returncode == 2
    assert "cannot expose on vsock:3:9999: expected the guest's hybrid address" in result.stderr
