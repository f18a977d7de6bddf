"""``vsockrpc serve`` and ``vsockrpc add`` as subprocesses over Unix sockets and TCP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "vsockrpc.cli.main"]


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    addresses: list[str]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=15)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


def start_server(tmp_path: Path, *listen: str, options: Sequence[str] = ()) -> ServerProcess:
    log = tmp_path / "server.log"
    args = [*options, *(arg for address in listen for arg in ("--listen", address))]
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*CLI, "serve", *args], stdout=subprocess.PIPE, stderr=log_file, text=True
        )
    assert process.stdout is not None
    addresses = []
    for _ in listen:
        line = process.stdout.readline()
        assert line.startswith("listening on "), (line, log.read_text())
        addresses.append(line.removeprefix("listening on ").strip())
    return ServerProcess(process, addresses, log)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], check=False, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path, f"unix:{tmp_path}/add.sock", "tcp:127.0.0.1:0", options=["--access-log"]
    )
    try:
        yield proc
    finally:
        proc.stop(signal.SIGKILL)


@pytest.mark.timeout(60)
def test_addition_over_unix_and_tcp(server: ServerProcess, tmp_path: Path) -> None:
    unix_address, tcp_address = server.addresses
    assert unix_address == f"unix:{tmp_path}/add.sock"
    assert tcp_address.startswith("tcp:127.0.0.1:") and not tcp_address.endswith(":0")

    result = run_cli("add", "5", "7", "--target", unix_address)
    assert (result.returncode, result.stdout) == (0, "Addition result: 5 + 7 = 12\n")
    result = run_cli("add", "--target", tcp_address, "--", "-40", "2")
    assert (result.returncode, result.stdout) == (0, "Addition result: -40 + 2 = -38\n")

    assert server.stop() == 0
    log = server.log.read_text()
    assert "Addition: 5 + 7 = 12" in log
    assert "Addition: -40 + 2 = -38" in log


@pytest.mark.timeout(60)
def test_int32_overflow_is_invalid_argument(server: ServerProcess) -> None:
    result = run_cli("add", "2147483647", "1", "--target", server.addresses[0])
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("vsockrpc: error: INVALID_ARGUMENT: ")
    assert "2147483647 + 1" in lines[0]
    # The largest sum that fits still works.
    result = run_cli("add", "2147483647", "-2147483648", "--target", server.addresses[1])
    assert result.stdout == "Addition result: 2147483647 + -2147483648 = -1\n"


@pytest.mark.timeout(60)
def test_no_server_prints_one_status_line_and_exits_1(tmp_path: Path) -> None:
    result = run_cli("add", "5", "7", "--target", f"unix:{tmp_path}/nobody.sock", "--timeout", "3")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vsockrpc: error: UNAVAILABLE")


@pytest.mark.timeout(60)
def test_wait_gives_up_with_unavailable_after_its_deadline(tmp_path: Path) -> None:
    result = run_cli(
        "add", "1", "2", "--target", f"unix:{tmp_path}/never.sock", "--wait", "1", "--timeout", "2"
    )
    assert result.returncode == 1
    assert result.stderr.startswith("vsockrpc: error: UNAVAILABLE")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.timeout(60)
def test_wait_succeeds_when_the_server_comes_up_late(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/late.sock"
    with subprocess.Popen(
        [*CLI, "add", "5", "7", "--target", address, "--wait", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as client:
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                client.wait(timeout=1.5)  # nothing listens yet: still retrying
            server = start_server(tmp_path, address)
            try:
                out, err = client.communicate(timeout=30)
            finally:
                server.stop()
        finally:
            client.kill()
    assert (client.returncode, out) == (0, "Addition result: 5 + 7 = 12\n"), err


@pytest.mark.parametrize(
    "args",
    [
        ["add", "5", "7"],  # --target missing
        ["add", "5", "x", "--target", "unix:/tmp/x"],
        ["add", "2147483648", "1", "--target", "unix:/tmp/x"],
        ["add", "5", "7", "--target", "vsock:abc:1"],
        ["add", "5", "7", "--target", "bogus"],
        ["add", "5", "7", "--target", "unix:/tmp/x", "--timeout", "-1"],
        ["add", "5", "7", "--target", "unix:/tmp/x", "--timeout", "0"],
        ["add", "5", "7", "--target", "unix:/tmp/x", "--wait", "nan"],
        ["serve", "--listen", "vsock:1:99999999999"],
        ["serve", "--listen", "unix:/tmp/x", "--workers", "0"],
    ],
)
@pytest.mark.timeout(30)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "error" in result.stderr


@pytest.mark.timeout(30)
def test_connect_to_cid_any_is_a_usage_error() -> None:
    # Parsed fine, but CID -1 names no peer: AddressError (exit 2), and no socket is connected.
    result = run_cli("add", "5", "7", "--target", "vsock:-1:9999")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "vsockrpc: error: cannot connect to vsock:-1:9999: CID -1 (any) is only for listening"
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signals(tmp_path: Path, sig: int) -> None:
    path = tmp_path / "sig.sock"
    proc = start_server(tmp_path, f"unix:{path}")
    assert path.exists()
    assert proc.stop(sig) == 0
    assert "stopping" in proc.log.read_text()


@pytest.mark.timeout(60)
def test_serve_replaces_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/s.sock"
    first = start_server(tmp_path, address)
    try:
        second = run_cli("serve", "--listen", address, timeout=20)
        assert second.returncode == 1
        assert "already listening" in second.stderr
    finally:
        first.stop(signal.SIGKILL)  # leaves the socket file behind
    assert os.path.exists(f"{tmp_path}/s.sock")
    third = start_server(tmp_path, address)
    try:
        assert (
            run_cli("add", "1", "1", "--target", address).stdout == "Addition result: 1 + 1 = 2\n"
        )
    finally:
        assert third.stop() == 0
