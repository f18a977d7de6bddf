"""One-shot QMP commands (:func:`vsockrpc.vm.qmp.qmp_command`) against a QMP server that hangs up.

QEMU closes its QMP socket right after replying to ``quit`` (and when it dies): the command has
its answer then, and a hang-up before the answer is a :class:`VmError`, never an ``EOFError``
escaping to ``vm stop``.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.integration.fake_qemu import qmp_commands, reply
from vsockrpc.errors import VmError
from vsockrpc.vm.qmp import qmp_command


def hang_up_server(path: Path, *, reply_last: bool) -> threading.Thread:
    """Greet one client, answer qmp_capabilities, then close the socket after the next command
    (having answered it when ``reply_last``), as QEMU does on ``quit``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o600)
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                for command in qmp_commands(conn):
                    last = command["execute"] != "qmp_capabilities"
                    if reply_last or not last:
                        reply(conn, command, {})
                    if last:
                        conn.shutdown(socket.SHUT_RDWR)
                        return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(30)
def test_a_hang_up_right_after_the_reply_is_success(tmp_path: Path) -> None:
    for i in range(5):
        path = tmp_path / f"qmp{i}.sock"
        server = hang_up_server(path, reply_last=True)
        assert qmp_command(path, "quit", timeout=10) == {}
        server.join(10)
        assert not server.is_alive()


@pytest.mark.timeout(30)
def test_a_hang_up_before_the_reply_is_a_vm_error(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    server = hang_up_server(path, reply_last=False)
    with pytest.raises(VmError, match="QMP quit failed"):
        qmp_command(path, "quit", timeout=10)
    server.join(10)
    assert not server.is_alive()


@pytest.mark.timeout(30)
def test_no_server_is_a_vm_error(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="QMP query-status failed"):
        qmp_command(tmp_path / "absent.sock", "query-status", timeout=5)
