"""QMP sessions (:mod:`vsockrpc.vm.qmpsession`) against a minimal QMP server on a Unix socket."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.integration.fake_qemu import qmp_commands, reply
from vsockrpc.errors import VmError
from vsockrpc.vm import qmpsession
from vsockrpc.vm.qmpsession import Session, run_session


def serve_one(listener: socket.socket) -> None:
    """Greet one client and answer each command with ``{"return": {"echo": NAME}}``."""
    conn, _ = listener.accept()
    with conn:
        for command in qmp_commands(conn):
            reply(conn, command, {"echo": command["execute"]})


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
