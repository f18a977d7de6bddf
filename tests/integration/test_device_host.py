"""The group host (``python -m vsockrpc.vhost --host GROUP``): launchers bring it VMs over its
socket (listening sockets and held fds by SCM_RIGHTS); one process serves them all, guests reach
each other through in-process links; it drops a VM whose launcher leaves before QEMU connects,
refuses bad joins with one line and keeps serving, and exits once idle, leaving no file."""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vsockrpc.errors import DeviceError, VmError
from vsockrpc.vhost.groups import read_pid_file
from vsockrpc.vhost.hostproto import join_host
from vsockrpc.vhost.paths import BoundPath, listen_unix
from vsockrpc.vhost.testing import GuestDriver, wait_all
from vsockrpc.vm.procs import alive
from vsockrpc.vm.vsockdev import HostedDevice

GROUP = "g"
PORT = 9000
MiB = 1 << 20
IDLE = 0.5

pytestmark = pytest.mark.timeout(90)


@dataclass
class Lab:
    tmp: str
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def groups(self) -> str:
        return os.path.join(self.tmp, "groups")

    @property
    def group_dir(self) -> str:
        return os.path.join(self.groups, GROUP)

    def start_host(self) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.tmp, "host.log"), "ab")  # noqa: SIM115 (the child's)
        with log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vsockrpc.vhost",
                    "--host",
                    GROUP,
                    "--groups-dir",
                    self.groups,
                    "--idle-exit",
                    str(IDLE),
                    "--fork-when-ready",
                    "-v",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.append(proc)
        return proc

    def log(self) -> str:
        with open(os.path.join(self.tmp, "host.log")) as f:
            return f.read()

    def host_pids(self) -> set[int]:
        """The hosts now running for the group (from their pid file)."""
        pid = read_pid_file(os.path.join(self.group_dir, "host.pid"))
        return {pid} if pid is not None and alive(pid) else set()


@dataclass
class Joined:
    conn: socket.socket
    host_pid: int
    vhost: str
    bound: list[BoundPath]


@pytest.fixture
def lab() -> Iterator[Lab]:
    d = tempfile.mkdtemp(prefix="vhost", dir="/tmp")
    lab = Lab(d)
    try:
        yield lab
    finally:
        for proc in lab.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for pid in lab.host_pids():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


def join(
    lab: Lab, cid: int, *, groups: tuple[str, ...] = (GROUP,), held: tuple[int, ...] = ()
) -> Joined:
    vhost_path, uds_path = os.path.join(lab.tmp, f"v{cid}"), os.path.join(lab.tmp, f"u{cid}")
    vhost, vb = listen_unix(vhost_path, backlog=1)
    hybrid, hb = listen_unix(uds_path)
    with vhost, hybrid:
        conn, pid = join_host(
            lab.groups,
            groups,
            cid=cid,
            uds=uds_path,
            exit_with_pid=None,
            fds=(vhost.fileno(), hybrid.fileno(), *held),
            start_host=lab.start_host,
        )
    return Joined(conn, pid, vhost_path, [vb, hb])


def assert_host_reaches(lab: Lab, guest: GuestDriver, port: int = 700) -> None:
    """A host client of the guest's hybrid socket gets a stream to its listener on ``port``."""
    guest.listen(port)
    with socket.socket(socket.AF_UNIX) as host:
        host.settimeout(10)
        host.connect(os.path.join(lab.tmp, f"u{guest.guest_cid}"))
        host.sendall(f"CONNECT {port}\n".encode())
        assert guest.accept(guest.listeners[port], timeout=10).peer_cid == 2


def assert_host_takes_a_passed_stream(lab: Lab, guest: GuestDriver, port: int = 701) -> None:
    """A host client that passes its stream with ``CONNECT`` (docs/device.md, "Passed
    streams") is answered ``PASSED``, and what is written to that stream reaches the guest."""
    listener = guest.listen(port)
    client, stream = socket.socketpair()
    with client, stream, socket.socket(socket.AF_UNIX) as control:
        control.settimeout(10)
        control.connect(os.path.join(lab.tmp, f"u{guest.guest_cid}"))
        socket.send_fds(control, [f"CONNECT {port}\n".encode()], [stream.fileno()])
        accepted = guest.accept(listener, timeout=10)
        guest.pump(0.05)  # our RESPONSE out: the host answers the client then
        assert control.recv(64).endswith(b" PASSED\n")
        stream.close()
        client.sendall(b"passed")
        guest.wait_for(lambda: len(accepted.rxbuf) >= 6, 10, "the passed stream's bytes")
        assert accepted.recv() == b"passed"


def gone(conn: socket.socket, timeout: float = 10) -> bool:
    """The host closed the launcher's connection (its VM's device left); closes ours."""
    conn.settimeout(timeout)
    try:
        return conn.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    finally:
        conn.close()


def host_exits(lab: Lab, pid: int) -> None:
    """The host (not our child: it forked when ready) ends, removing its socket and pid file."""
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, "the host did not exit"
        time.sleep(0.02)
    assert not os.path.exists(os.path.join(lab.group_dir, "host.sock"))
    assert not os.path.exists(os.path.join(lab.group_dir, "host.pid"))


def test_two_vms_share_one_host_reach_each_other_and_the_host_exits_when_idle(lab: Lab) -> None:
    a = join(lab, 5)
    b = join(lab, 6)
    assert len(lab.started) == 1 and lab.started[0].returncode == 0  # forked when ready
    assert a.host_pid == b.host_pid and lab.host_pids() == {a.host_pid}
    with GuestDriver(a.vhost, guest_cid=5) as ga, GuestDriver(b.vhost, guest_cid=6) as gb:
        ga.boot()
        gb.boot()
        listener = gb.listen(PORT)
        sa = ga.connect_start(PORT, cid=6)
        wait_all([ga, gb], lambda: bool(listener.backlog), 10, "B accepts A")
        sb = listener.backlog.popleft()
        assert (sb.peer_cid, sb.peer_port) == (5, sa.local_port)
        data_a, data_b = os.urandom(MiB), os.urandom(MiB)
        sa.send(data_a)
        sb.send(data_b)
        got_a, got_b = bytearray(), bytearray()

        def done() -> bool:
            got_a.extend(sa.recv())
            got_b.extend(sb.recv())
            return len(got_a) >= MiB and len(got_b) >= MiB

        wait_all([ga, gb], done, 60, "1 MiB each way")
        assert hashlib.sha256(got_a).digest() == hashlib.sha256(data_b).digest()
        assert hashlib.sha256(got_b).digest() == hashlib.sha256(data_a).digest()
        # The host → guest path of each VM works as with a device of its own.
        assert_host_reaches(lab, ga)
        assert_host_takes_a_passed_stream(lab, gb)
    # Both front-ends gone: the host tells each launcher, then exits once idle.
    assert gone(a.conn) and gone(b.conn)
    host_exits(lab, a.host_pid)
    assert os.listdir(lab.group_dir) == []
    for joined in (a, b):
        for bound in joined.bound:
            assert bound.unlink()  # still the launcher's own files: the host removed none


def test_a_vm_whose_launcher_leaves_before_qemu_connects_is_dropped(lab: Lab) -> None:
    a = join(lab, 5)
    read_end, write_end = os.pipe()
    b = join(lab, 6, held=(write_end,))
    os.close(write_end)  # the host holds the only other copy
    b.conn.close()  # B's launcher is gone and its QEMU never connected
    assert select.select([read_end], [], [], 10)[0], "the host kept B's held fd"
    assert os.read(read_end, 1) == b""
    os.close(read_end)
    deadline = time.monotonic() + 10
    while os.path.exists(os.path.join(lab.group_dir, "6.pid")):
        assert time.monotonic() < deadline, "B's membership was not dropped"
        time.sleep(0.02)
    assert alive(a.host_pid), "A is still served"
    with GuestDriver(a.vhost, guest_cid=5) as ga:
        ga.boot()
    assert gone(a.conn)
    host_exits(lab, a.host_pid)


def _raw_join(lab: Lab, line: bytes, fds: list[int]) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.path.join(lab.group_dir, "host.sock"))
        rights = array.array("i", fds).tobytes()
        s.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else [])
        return s.makefile("rb").readline().decode().strip()


def _request(cid: int, **over: object) -> bytes:
    body: dict[str, object] = {
        "cid": cid,
        "uds": "/tmp/x.sock",
        "groups": [GROUP],
        "exit_with_pid": None,
    }
    body.update(over)
    return (json.dumps(body) + "\n").encode()


@pytest.mark.parametrize(
    ("line", "sockets", "answer"),
    [
        (b"hello\n", 2, "ERR not a JSON request"),
        (b'{"cid": 7}\n', 2, "ERR not a join request"),
        (_request(1), 2, "ERR bad guest CID 1"),
        (_request(7, uds="relative"), 2, "ERR bad hybrid socket path"),
        (_request(7, groups=["other", GROUP]), 2, "ERR its first group is 'other'"),
        (_request(7, groups=["../x"]), 2, "ERR '../x' is not a group name"),
        (_request(7, exit_with_pid=-3), 2, "ERR bad pid -3"),
        (_request(7), 0, "ERR the vhost-user and hybrid sockets did not come"),
        (_request(5), 2, "ERR CID 5 is already served here"),
        (_request(7), -1, "ERR the vhost-user fd is not a listening Unix stream socket"),
        (_request(7), -2, "ERR the hybrid fd is not a listening Unix stream socket"),
    ],
)
def test_bad_joins_get_one_line_and_the_host_serves_on(
    lab: Lab, line: bytes, sockets: int, answer: str
) -> None:
    a = join(lab, 5)
    host_fds = len(os.listdir(f"/proc/{a.host_pid}/fd"))
    with contextlib.ExitStack() as stack:
        fds: list[int] = []
        if sockets > 0:
            for n in range(sockets):
                sock, bound = listen_unix(os.path.join(lab.tmp, f"bad{n}"))
                stack.enter_context(sock)
                stack.callback(bound.unlink)
                fds.append(sock.fileno())
        elif sockets == -1:  # two connected sockets, not listening ones
            left, right = socket.socketpair()
            stack.enter_context(left)
            stack.enter_context(right)
            fds = [left.fileno(), right.fileno()]
        elif sockets == -2:  # a listening socket, then a connected one
            sock, bound = listen_unix(os.path.join(lab.tmp, "good"))
            stack.enter_context(sock)
            stack.callback(bound.unlink)
            left, right = socket.socketpair()
            stack.enter_context(left)
            stack.enter_context(right)
            fds = [sock.fileno(), left.fileno()]
        assert _raw_join(lab, line, fds).startswith(answer)
    # Every fd the refused join brought was closed (the refusal is sent before they are).
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{a.host_pid}/fd")) != host_fds:
        assert time.monotonic() < deadline, "the host kept fds of a refused join"
        time.sleep(0.02)
    assert alive(a.host_pid)
    with GuestDriver(a.vhost, guest_cid=5) as ga:
        ga.boot()
        assert_host_reaches(lab, ga)
    assert not os.path.exists(os.path.join(lab.group_dir, "7.pid"))
    assert gone(a.conn)
    host_exits(lab, a.host_pid)


def test_launchers_joining_at_once_start_a_single_host(lab: Lab) -> None:
    results: dict[int, Joined | BaseException] = {}

    def one(cid: int) -> None:
        try:
            results[cid] = join(lab, cid)
        except BaseException as err:
            results[cid] = err

    threads = [threading.Thread(target=one, args=(cid,)) for cid in range(10, 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    joined = [r for r in results.values() if isinstance(r, Joined)]
    assert len(joined) == 4, results
    pids = {j.host_pid for j in joined}
    assert len(lab.started) == 1 and len(pids) == 1
    for j in joined:
        j.conn.close()  # no QEMU ever came: each VM is dropped
    host_exits(lab, pids.pop())


def test_a_second_host_for_the_group_exits_1_and_a_joiner_of_a_dead_host_starts_anew(
    lab: Lab,
) -> None:
    a = join(lab, 5)
    second = subprocess.run(
        [sys.executable, "-m", "vsockrpc.vhost", "--host", GROUP, "--groups-dir", lab.groups],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"python -m vsockrpc.vhost: error: group {GROUP} already has a device host "
        f"(pid {a.host_pid})"
    ]
    os.kill(a.host_pid, signal.SIGKILL)  # dies without cleaning up: stale files stay
    deadline = time.monotonic() + 10
    while alive(a.host_pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    a.conn.close()
    b = join(lab, 6)
    assert len(lab.started) == 2 and b.host_pid != a.host_pid
    b.conn.close()
    host_exits(lab, b.host_pid)
    # The new host replaced the stale host.sock and removed its own files; CID 5's stale pair
    # waits for the next member with that CID (which takes it over, docs/device.md).
    assert sorted(os.listdir(lab.group_dir)) == ["5.pid", "5.sock"]


def test_join_errors_are_device_errors_naming_the_group(lab: Lab) -> None:
    def broken_host() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        lab.started.append(proc)
        return proc

    with pytest.raises(DeviceError, match=f"group {GROUP}'s device host exited with status 3"):
        join_host(
            lab.groups,
            (GROUP,),
            cid=5,
            uds="/tmp/u",
            exit_with_pid=None,
            fds=(),
            start_host=broken_host,
        )


def test_a_watched_qemu_keeps_its_vm_after_the_launcher_leaves_until_it_exits(lab: Lab) -> None:
    """A detached launcher: WATCH <qemu pid>, then its connection closes before QEMU connected.
    The VM stays served while that process lives, and is dropped when it exits; a WATCH of a
    process that is already gone drops the VM at once; other lines are ignored."""
    qemu = subprocess.Popen(["sleep", "60"])
    try:
        a = join(lab, 5)
        a.conn.sendall(b"HELLO there\n" + f"WATCH {qemu.pid}\n".encode())
        a.conn.close()
        time.sleep(0.5)
        assert os.path.exists(os.path.join(lab.group_dir, "5.pid")), "dropped while watched"
        b = join(lab, 6)
        dead = subprocess.Popen(["true"])
        dead.wait()
        b.conn.sendall(f"WATCH {dead.pid}\n".encode())
        assert gone(b.conn), "a VM whose QEMU is already gone is dropped"
        qemu.kill()
        qemu.wait()
        deadline = time.monotonic() + 10
        while os.path.exists(os.path.join(lab.group_dir, "5.pid")):
            assert time.monotonic() < deadline, "the VM outlived its watched QEMU"
            time.sleep(0.02)
        host_exits(lab, a.host_pid)
        assert "ignored b'HELLO there'" in lab.log()
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()


def test_a_join_with_too_many_fds_is_closed_unanswered_and_its_fds_released(lab: Lab) -> None:
    a = join(lab, 5)
    read_end, write_end = os.pipe()
    try:
        extra = [os.dup(write_end) for _ in range(7)]  # more than the sockets and MAX_HELD
        os.close(write_end)
        answer = _raw_join(lab, _request(7), extra)
        for fd in extra:
            os.close(fd)
        assert answer == ""  # closed without a word
        assert select.select([read_end], [], [], 10)[0], "the host kept a copy of a refused fd"
        assert os.read(read_end, 1) == b""
    finally:
        os.close(read_end)
    deadline = time.monotonic() + 10  # the host logs it just after closing the fds
    while "join refused: too many file descriptors" not in lab.log():
        assert time.monotonic() < deadline, lab.log()
        time.sleep(0.02)
    assert alive(a.host_pid) and not os.path.exists(os.path.join(lab.group_dir, "7.pid"))
    a.conn.close()
    host_exits(lab, a.host_pid)


def test_a_host_that_cannot_start_is_one_launcher_error_naming_why(lab: Lab) -> None:
    """A symlink planted where the host's pid file goes: the host refuses it and exits 1; the
    launcher's one-line error carries the host's reason, and it leaves no socket behind."""
    os.makedirs(lab.group_dir, mode=0o700)
    os.symlink(os.path.join(lab.tmp, "elsewhere"), os.path.join(lab.group_dir, "host.pid"))
    run_dir = Path(lab.tmp) / "run"
    run_dir.mkdir()
    with pytest.raises(VmError) as caught:
        HostedDevice(
            vhost_socket=run_dir / "vhost-user.sock",
            hybrid_socket=run_dir / "vsock.sock",
            guest_cid=5,
            log_file=run_dir / "device.log",
            groups=[GROUP],
            groups_dir=Path(lab.groups),
        )
    message = str(caught.value)
    assert message.startswith("cannot start the userspace vsock device: group g's device host")
    assert "exited with status 1 (group g's host: cannot open the pid file" in message
    assert "\n" not in message
    assert sorted(os.listdir(run_dir)) == []  # both sockets removed again
    assert not os.path.exists(os.path.join(lab.tmp, "elsewhere"))
