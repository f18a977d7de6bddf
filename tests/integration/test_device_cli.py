"""``vsockrpc device`` as a process: serves QEMU's protocol, exits 0 on SIGTERM."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from vsockrpc.vhost.testing import GuestDriver


@pytest.fixture
def tmp() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdc", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _exchange(vpath: str, upath: str, cid: int) -> None:
    with GuestDriver(vpath, guest_cid=cid) as g:
        g.boot()
        assert g.config_cid == cid
        listener = g.listen(42)
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(upath)
            c.sendall(b"connect 42\nping")
            stream = g.accept(listener)
            g.wait_for(lambda: len(stream.rxbuf) >= 4, 5)
            assert stream.recv() == b"ping"
            assert c.recv(100).startswith(b"OK ")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# The CLI started with a soft open-files limit of 64 (the hard one unchanged).
LOW_LIMIT_CLI = [
    sys.executable,
    "-c",
    "import resource as r, runpy, sys; "
    "r.setrlimit(r.RLIMIT_NOFILE, (64, r.getrlimit(r.RLIMIT_NOFILE)[1])); "
    "sys.argv[0] = 'vsockrpc'; runpy.run_module('vsockrpc.cli.main', run_name='__main__')",
]


def _open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of process ``pid``."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.timeout(30)
def test_device_cli_socket_path_sigterm(tmp: str) -> None:
    vpath, upath = os.path.join(tmp, "v.sock"), os.path.join(tmp, "u.sock")
    proc = subprocess.Popen(
        [*LOW_LIMIT_CLI, "device", "--socket", vpath, "--uds", upath, "--cid", "9"],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(upath):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Started with a soft limit of 64 files, it raised it to the hard limit.
        assert _open_files_limit(proc.pid) == resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        _exchange(vpath, upath, 9)
    finally:
        code = _stop(proc)
        if proc.stderr:
            proc.stderr.close()
    assert code == 0
    assert not os.path.exists(upath) and not os.path.exists(vpath)


@pytest.mark.timeout(30)
def test_device_cli_inherited_fd(tmp: str) -> None:
    vpath, upath = os.path.join(tmp, "v.sock"), os.path.join(tmp, "u.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(vpath)
    listener.listen()
    fd = listener.fileno()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vsockrpc.cli.main",
            "device",
            "--socket-fd",
            str(fd),
            "--uds",
            upath,
            "--cid",
            "11",
        ],
        pass_fds=[fd],
    )
    listener.close()  # the child owns it now; QEMU may connect before the child runs
    try:
        _exchange(vpath, upath, 11)
    finally:
        code = _stop(proc)
    assert code == 0


@pytest.mark.timeout(30)
def test_device_cli_rejects_reserved_cid(tmp: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vsockrpc.cli.main",
            "device",
            "--socket",
            os.path.join(tmp, "v"),
            "--uds",
            os.path.join(tmp, "u"),
            "--cid",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2  # the user's input: a usage error
    assert result.stderr.splitlines() == [
        "vsockrpc: error: guest CID 2 is reserved or out of range (use >= 3)"
    ]
    assert not os.listdir(tmp)  # nothing half-made left behind
