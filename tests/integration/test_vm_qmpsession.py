"""QMP sessions (:mod:`vsockrpc.vm.qmpsession`) against a minimal QMP server on a Unix socket."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from vsockrpc.errors import VmError
from vsockrpc.vm import qmpsession
from vsockrpc.vm.qmpsession import Session, run_session

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}


def serve_one(listener: socket.socket) -> None:
    """Greet one client and answer each command with ``{"return": {"echo": NAME}}``."""
    decoder = json.JSONDecoder()
    conn, _ = listener.accept()
    with conn:
        conn.sendall(json.dumps(GREETING).encode() + b"\n")
        buffer = ""
        while chunk := conn.recv(4096):
            buffer += chunk.decode()
            while buffer.strip():  # a JSON stream: commands end without a newline
                try:
                    command, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break
                buffer = buffer.lstrip()[end:]
                reply = {"return": {"echo": command["execute"]}}
                if "id" in command:
                    reply["id"] = command["id"]
                conn.sendall(json.dumps(reply).encode() + b"\n")


async def query(s: Session) -> object:
    return await s.run("query-status")


@pytest.mark.timeout(30)
def test_a_socket_that_exists_before_qemu_listens_is_retried(tmp_path: Path) -> None:
    # QEMU binds its QMP socket before it listens: connecting in between is refused.
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o600)

    def listen_later() -> None:
        threading.Event().wait(0.5)
        listener.listen(1)
        serve_one(listener)

    server = threading.Thread(target=listen_later, daemon=True)
    server.start()
    try:
        assert run_session(path, query, timeout=20) == {"echo": "query-status"}
    finally:
        server.join(10)
        listener.close()


@pytest.mark.timeout(30)
def test_a_socket_that_never_listens_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmpsession, "CONNECT_GRACE", 0.3)
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))
        with pytest.raises(VmError, match=r"cannot reach QEMU.s QMP socket: .*refused"):
            run_session(path, query, timeout=20)


@pytest.mark.timeout(30)
def test_a_missing_socket_is_not_retried(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="cannot reach QEMU's QMP socket"):
        run_session(tmp_path / "absent.sock", query, timeout=5)
