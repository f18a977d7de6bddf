"""Groups with the device as a process (``python -m vsockrpc.vhost --group NAME --groups-dir DIR``):
siblings across processes (SO_PEERCRED against the pid files), CID collisions, usage errors,
and the group files removed at exit."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from vsockrpc.vhost.testing import GuestDriver, pump_all, wait_all

A, B = 5, 6
PORT = 9000
MiB = 1 << 20

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def tmp() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vgc", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _argv(tmp: str, cid: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vsockrpc.vhost",
        "--socket",
        os.path.join(tmp, f"v{cid}"),
        "--uds",
        os.path.join(tmp, f"u{cid}"),
        "--cid",
        str(cid),
        *extra,
    ]


def _group_args(tmp: str, *groups: str) -> list[str]:
    out = ["--groups-dir", os.path.join(tmp, "groups")]
    for g in groups:
        out += ["--group", g]
    return out


@contextlib.contextmanager
def device(tmp: str, cid: int, *groups: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        _argv(tmp, cid, *_group_args(tmp, *groups), "-v"),
        stderr=subprocess.PIPE,
    )
    try:
        # Ready once its socket exists and its pid file names it (a stale pair may be there).
        sock = os.path.join(tmp, "groups", groups[-1], f"{cid}.sock")
        pid = os.path.join(tmp, "groups", groups[-1], f"{cid}.pid")
        deadline = time.monotonic() + 30
        while not (_read(pid) == f"{proc.pid}\n" and _answers(sock)):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "device did not start"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def test_siblings_across_processes_with_data_both_ways(tmp: str) -> None:
    with (
        device(tmp, A, "g") as dev_a,
        device(tmp, B, "g") as dev_b,
        GuestDriver(os.path.join(tmp, f"v{A}"), guest_cid=A) as ga,
        GuestDriver(os.path.join(tmp, f"v{B}"), guest_cid=B) as gb,
    ):
        ga.boot()
        gb.boot()
        group = os.path.join(tmp, "groups", "g")
        assert oct(os.stat(group).st_mode & 0o777) == "0o700"
        assert oct(os.stat(os.path.join(group, f"{A}.sock")).st_mode & 0o777) == "0o600"
        with open(os.path.join(group, f"{A}.pid")) as f:
            assert int(f.read()) == dev_a.pid
        listener = gb.listen(PORT)
        a = ga.connect_start(PORT, cid=B)
        wait_all([ga, gb], lambda: a.state.value != "connecting", 10, "connect")
        assert a.state.value == "established"
        wait_all([ga, gb], lambda: bool(listener.backlog), 5, "accept")
        b = listener.backlog.popleft()
        assert (b.peer_cid, b.peer_port) == (A, a.local_port)
        data_a, data_b = os.urandom(MiB), os.urandom(MiB)
        a.send(data_a)
        b.send(data_b)
        got_a, got_b = bytearray(), bytearray()

        def done() -> bool:
            got_a.extend(a.recv())
            got_b.extend(b.recv())
            return len(got_a) >= MiB and len(got_b) >= MiB

        wait_all([ga, gb], done, 60, "1 MiB each way")
        assert hashlib.sha256(got_a).digest() == hashlib.sha256(data_b).digest()
        assert hashlib.sha256(got_b).digest() == hashlib.sha256(data_a).digest()
        # This process is not device A: claiming A's CID on B's socket is refused.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(os.path.join(group, f"{B}.sock"))
            s.sendall(f"SIBLING g {A} 1234 {PORT}\n".encode())
            assert s.recv(16) == b""
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pump_all([ga, gb], 0.01)
        assert not listener.backlog and dev_b.poll() is None


def test_cid_collision_in_a_group_exits_1_with_one_line(tmp: str) -> None:
    with device(tmp, A, "g", "h"):
        out = subprocess.run(
            _argv(tmp, A, *_group_args(tmp, "h")),
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1
        assert out.stderr.strip().splitlines() == [
            "python -m vsockrpc.vhost: error: CID 5 is already a member of group h"
        ]
        # The loser removed nothing of the winner's, and its own sockets.
        assert os.path.exists(os.path.join(tmp, "groups", "h", f"{A}.sock"))
    # The same CID in another group is no collision.
    with device(tmp, A, "g"), device(tmp, A, "other"):
        pass


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--group", "../x", "--groups-dir", "d"], "is not a group name"),
        (["--group", "", "--groups-dir", "d"], "is not a group name"),
        (["--group", "a" * 65, "--groups-dir", "d"], "is not a group name"),
        (["--group", "ok"], "--group needs --groups-dir"),
    ],
)
def test_bad_group_arguments_are_usage_errors(tmp: str, extra: list[str], message: str) -> None:
    out = subprocess.run(
        _argv(tmp, A, *extra), check=False, capture_output=True, text=True, timeout=30, cwd=tmp
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(os.path.join(tmp, f"v{A}"))


def test_group_files_removed_at_exit_and_stale_ones_replaced(tmp: str) -> None:
    group = os.path.join(tmp, "groups", "g")
    sock, pid = os.path.join(group, f"{A}.sock"), os.path.join(group, f"{A}.pid")
    with device(tmp, A, "g") as proc:
        assert os.path.exists(sock) and os.path.exists(pid)
    assert proc.returncode == 0
    assert not os.path.exists(sock) and not os.path.exists(pid)
    # A pair left by a device that died: a socket nobody listens on, a dead pid.
    dead = subprocess.Popen(["true"])
    dead.wait()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(sock)
    with open(pid, "w") as f:
        f.write(f"{dead.pid}\n")
    with device(tmp, A, "g") as proc:
        with open(pid) as f:
            assert int(f.read()) == proc.pid
        assert _answers(sock)  # the stale socket was replaced by a listening one
    assert not os.path.exists(sock) and not os.path.exists(pid)


def test_a_group_directory_that_is_a_symlink_is_refused(tmp: str) -> None:
    os.makedirs(os.path.join(tmp, "groups"), mode=0o700)
    os.makedirs(os.path.join(tmp, "elsewhere"), mode=0o700)
    os.symlink(os.path.join(tmp, "elsewhere"), os.path.join(tmp, "groups", "g"))
    out = subprocess.run(
        _argv(tmp, A, *_group_args(tmp, "g")),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "is a symlink" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert os.listdir(os.path.join(tmp, "elsewhere")) == []


# ---------------------------------------------------------------------- one process, several VMs
def _vm(tmp: str, cid: int, groups: str = "g") -> str:
    vhost, uds = os.path.join(tmp, f"v{cid}"), os.path.join(tmp, f"u{cid}")
    spec = f"guest-cid={cid},socket={vhost},uds-path={uds}"
    return f"{spec},groups={groups}" if groups else spec


def _vm_argv(tmp: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vsockrpc.vhost", *extra]


def test_one_process_serves_two_vms_that_reach_each_other_and_exits_after_both(tmp: str) -> None:
    proc = subprocess.Popen(
        _vm_argv(
            tmp,
            "--vm",
            _vm(tmp, A),
            "--vm",
            _vm(tmp, B),
            "--groups-dir",
            os.path.join(tmp, "groups"),
            "--exit-on-disconnect",
        ),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not all(os.path.exists(os.path.join(tmp, f"u{c}")) for c in (A, B)):
            assert proc.poll() is None and time.monotonic() < deadline, "device did not start"
            time.sleep(0.02)
        group = os.path.join(tmp, "groups", "g")
        for cid in (A, B):  # members for devices of other processes too, both by this pid
            assert _read(os.path.join(group, f"{cid}.pid")) == f"{proc.pid}\n"
        with GuestDriver(os.path.join(tmp, f"v{A}"), guest_cid=A) as ga:
            with GuestDriver(os.path.join(tmp, f"v{B}"), guest_cid=B) as gb:
                ga.boot()
                gb.boot()
                listener = gb.listen(PORT)
                a = ga.connect_start(PORT, cid=B)
                wait_all([ga, gb], lambda: bool(listener.backlog), 10, "accept")
                b = listener.backlog.popleft()
                assert (b.peer_cid, b.peer_port) == (A, a.local_port)
                data = os.urandom(MiB)
                a.send(data)
                got = bytearray()

                def done() -> bool:
                    got.extend(b.recv())
                    return len(got) >= MiB

                wait_all([ga, gb], done, 60, "1 MiB A → B")
                assert bytes(got) == data
            # B's front-end is gone: only its device stopped; A still reaches the host.
            time.sleep(0.3)
            assert proc.poll() is None
            assert not os.path.exists(os.path.join(tmp, f"u{B}"))
            assert not os.path.exists(os.path.join(group, f"{B}.sock"))
            ga.listen(700)
            with socket.socket(socket.AF_UNIX) as host:
                host.settimeout(10)
                host.connect(os.path.join(tmp, f"u{A}"))
                host.sendall(b"CONNECT 700\n")
                stream = ga.accept(ga.listeners[700], timeout=10)
                assert stream.peer_cid == 2
        proc.wait(10)  # the last front-end left: the process exits
        assert proc.returncode == 0
        assert os.listdir(group) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vm", "guest-cid=5,socket=s"], "missing uds-path"),
        (["--vm", "guest-cid=x,socket=s,uds-path=u"], "guest-cid 'x' is not a number"),
        (["--vm", "cid=5,socket=s,uds-path=u"], "expected guest-cid=N"),
        (["--vm", "guest-cid=5,guest-cid=6,socket=s,uds-path=u"], "guest-cid given twice"),
        (["--vm", "guest-cid=5,socket=s,uds-path=u,groups=../x"], "is not a group name"),
        (["--vm", "guest-cid=5,socket=s,uds-path=u", "--cid", "5"], "--cid does not go with"),
        (["--vm", "guest-cid=5,socket=s,uds-path=u", "--socket", "x"], "not allowed with"),
        (
            ["--vm", "guest-cid=5,socket=s,uds-path=u", "--vm", "guest-cid=5,socket=t,uds-path=v"],
            "two --vm give the same guest-cid 5",
        ),
        (
            ["--vm", "guest-cid=5,socket=s,uds-path=u", "--vm", "guest-cid=6,socket=s,uds-path=v"],
            "two --vm give the same socket s",
        ),
        (["--vm", "guest-cid=5,socket=s,uds-path=u,groups=g"], "--group needs --groups-dir"),
        (["--uds", "u", "--cid", "5"], "one of --socket, --socket-fd, --vm or --host is required"),
        (["--host", "g"], "--host needs --groups-dir"),
        (["--host", "../g", "--groups-dir", "d"], "is not a group name"),
        (["--host", "g", "--groups-dir", "d", "--cid", "5"], "--cid does not go with --host"),
        (["--host", "g", "--groups-dir", "d", "--group", "h"], "--host takes no --group"),
        (["--host", "g", "--groups-dir", "d", "--idle-exit", "nan"], "is not a number of seconds"),
        (["--host", "g", "--groups-dir", "d", "--idle-exit", "0"], "is not a number of seconds"),
        (["--socket", "s", "--uds", "u", "--cid", "5", "--idle-exit", "2"], "go with --host only"),
        (["--socket", "s", "--uds", "u", "--cid", "5", "--fork-when-ready"], "go with --host only"),
        (["--socket", "s", "--cid", "5"], "--uds and --cid are required"),
    ],
)
def test_bad_vm_and_host_arguments_are_usage_errors(
    tmp: str, extra: list[str], message: str
) -> None:
    out = subprocess.run(
        _vm_argv(tmp, *extra), check=False, capture_output=True, text=True, timeout=30, cwd=tmp
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert os.listdir(tmp) == [], "nothing created"
