"""The device as a process (``python -m vsockrpc.vhost``): it never outlives its VM, never
removes a socket file it does not own, and a hostile hybrid client cannot make it spin.

"QEMU" and the launcher are stand-in processes here (the test driver plays QEMU), so killing
them with SIGKILL is safe and exact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from vsockrpc.vhost.testing import GuestDriver
from vsockrpc.vm.procs import alive

DEVICE = [sys.executable, "-m", "vsockrpc.vhost"]
EXIT_WITHIN = 5.0  # seconds: "within a few seconds" of its QEMU or parent going away


@pytest.fixture
def tmp() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdl", dir="/tmp")  # short: sun_path
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (/proc/PID/stat fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(vpath: str, upath: str, cid: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*DEVICE, "--socket", vpath, "--uds", upath, "--cid", str(cid), *extra],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 15
    while not (os.path.exists(upath) and os.path.exists(vpath)):
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read() if proc.stderr else b"device exited")
        assert time.monotonic() < deadline, "device did not create its sockets"
        time.sleep(0.02)
    return proc


def _finish(proc: subprocess.Popen[bytes], sig: int | None = signal.SIGTERM) -> int:
    try:
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _wait_exit(pid: int, timeout: float = EXIT_WITHIN) -> float:
    start = time.monotonic()
    while alive(pid):
        assert time.monotonic() - start < timeout, f"device {pid} still running after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


@contextlib.contextmanager
def _stand_in(code: str) -> Iterator[subprocess.Popen[str]]:
    """A stand-in process (QEMU or a launcher) that prints one line when ready; killed and
    reaped when the block ends."""
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _ready_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"stand-in exited early ({proc.poll()})"
    return line


# ---------------------------------------------------------------------- hostile client
@pytest.mark.timeout(90)
def test_partial_command_line_does_not_make_the_device_spin(tmp: str) -> None:
    """Issue 13 item 4: a client sends ``C`` and waits (reconnecting when the device drops it
    after 2 s), another reconnects every 1.9 s. Before the fix the device burnt a core."""
    vpath, upath = os.path.join(tmp, "v"), os.path.join(tmp, "u")
    proc = _start(vpath, upath, 7)
    clients: list[socket.socket] = []
    try:
        with GuestDriver(vpath, guest_cid=7) as guest:
            guest.boot()  # a running device, as under a real VM

            def attacker() -> socket.socket:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect(upath)
                s.sendall(b"C")
                clients.append(s)
                return s

            waiter, cycler = attacker(), attacker()
            cycled = time.monotonic()
            cpu0 = _cpu_seconds(proc.pid)
            end = time.monotonic() + 10
            while time.monotonic() < end:
                time.sleep(0.1)
                waiter.setblocking(False)
                try:
                    dropped = waiter.recv(1) == b""  # dropped at the 2 s deadline: come back
                except BlockingIOError:
                    dropped = False
                except ConnectionResetError:  # dropped with our byte unread
                    dropped = True
                if dropped:
                    waiter.close()
                    waiter = attacker()
                if time.monotonic() - cycled >= 1.9:
                    cycler.close()
                    cycler = attacker()
                    cycled = time.monotonic()
            used = _cpu_seconds(proc.pid) - cpu0
    finally:
        for s in clients:
            s.close()
        code = _finish(proc)
    print(f"device CPU during 10 s of partial command lines: {used:.3f} s")
    assert used < 0.5, f"device used {used:.2f} s of CPU in 10 s of partial command lines"
    assert code == 0


# ---------------------------------------------------------------------- dies with its VM
@pytest.mark.timeout(60)
def test_device_exits_when_its_qemu_is_killed(tmp: str) -> None:
    vpath, upath = os.path.join(tmp, "v"), os.path.join(tmp, "u")
    proc = _start(vpath, upath, 8, "--exit-on-disconnect")
    with _stand_in(
        f"""
        import time
        from vsockrpc.vhost.testing import GuestDriver
        g = GuestDriver({vpath!r}, guest_cid=8)
        g.boot()
        print("booted", flush=True)
        time.sleep(60)
        """
    ) as qemu:
        try:
            assert _ready_line(qemu) == "booted"
            qemu.kill()  # kill -9 of "QEMU": the kernel closes its vhost-user socket
            qemu.wait()
            _wait_exit(proc.pid)
        finally:
            code = _finish(proc)
    assert code == 0
    assert not os.path.exists(upath) and not os.path.exists(vpath)


@pytest.mark.timeout(60)
def test_device_without_the_flag_waits_for_the_next_front_end(tmp: str) -> None:
    vpath, upath = os.path.join(tmp, "v"), os.path.join(tmp, "u")
    proc = _start(vpath, upath, 8)
    try:
        with GuestDriver(vpath, guest_cid=8) as g:
            g.boot()
        with GuestDriver(vpath, guest_cid=8) as g:  # a second QEMU is served
            g.boot()
            assert g.config_cid == 8
        assert proc.poll() is None
    finally:
        assert _finish(proc) == 0


@pytest.mark.timeout(60)
def test_device_exits_with_a_watched_pid(tmp: str) -> None:
    vpath, upath = os.path.join(tmp, "v"), os.path.join(tmp, "u")
    with subprocess.Popen(["sleep", "60"]) as watched:
        proc = _start(vpath, upath, 9, "--exit-with-pid", str(watched.pid))
        try:
            time.sleep(0.3)
            assert proc.poll() is None
            watched.kill()
            watched.wait()
            _wait_exit(proc.pid)
        finally:
            code = _finish(proc)
    assert code == 0
    assert not os.path.exists(upath)


@pytest.mark.timeout(30)
def test_exit_with_pid_of_a_missing_process_is_one_line(tmp: str) -> None:
    with subprocess.Popen(["true"]) as gone:
        gone.wait()
    argv = [*DEVICE, "--socket", f"{tmp}/v", "--uds", f"{tmp}/u", "--cid", "9"]
    result = subprocess.run(
        [*argv, "--exit-with-pid", str(gone.pid)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"python -m vsockrpc.vhost: error: process {gone.pid} to exit with is not running"
    ]
    assert not os.listdir(tmp)


@pytest.mark.timeout(60)
def test_device_exits_with_its_parent(tmp: str) -> None:
    vpath, upath = os.path.join(tmp, "v"), os.path.join(tmp, "u")
    with _stand_in(
        f"""
        import subprocess, sys, time
        device = subprocess.Popen(
            [sys.executable, "-m", "vsockrpc.vhost", "--socket", {vpath!r}, "--uds", {upath!r},
             "--cid", "10", "--exit-with-parent"]
        )
        print(device.pid, flush=True)
        time.sleep(60)
        """
    ) as parent:
        device_pid = int(_ready_line(parent))
        deadline = time.monotonic() + 15
        while not os.path.exists(upath):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
        _wait_exit(device_pid)
    deadline = time.monotonic() + 5
    while os.path.exists(upath):  # it exited through SIGTERM → its normal cleanup
        assert time.monotonic() < deadline, "device left its socket behind"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_launcher_device_dies_with_the_launcher(tmp: str) -> None:
    """vm/vsockdev.UserspaceDevice (what ``vm run`` starts): kill -9 of the launcher before
    QEMU ever connected still ends the device (--exit-with-pid <launcher>)."""
    with _stand_in(
        f"""
        import time
        from pathlib import Path
        from vsockrpc.vm.vsockdev import UserspaceDevice
        d = Path({tmp!r})
        dev = UserspaceDevice(
            vhost_socket=d / "v", hybrid_socket=d / "u", guest_cid=11, log_file=d / "log"
        )
        print(dev.pid, flush=True)
        time.sleep(60)
        """
    ) as launcher:
        device_pid = int(_ready_line(launcher))
        time.sleep(0.5)
        assert alive(device_pid)
        assert oct(os.stat(f"{tmp}/u").st_mode & 0o777) == "0o600"
        launcher.kill()
        launcher.wait()
        _wait_exit(device_pid)


@pytest.mark.timeout(60)
def test_launcher_device_serves_qemu_and_exits_with_it(tmp: str) -> None:
    """The launcher's device on its inherited sockets: a front-end (the test driver as QEMU)
    boots, a host client reaches the guest through the hybrid socket, and the device exits
    when that front-end goes away."""
    from pathlib import Path

    from vsockrpc.vm.vsockdev import UserspaceDevice

    d = Path(tmp)
    with UserspaceDevice(
        vhost_socket=d / "v", hybrid_socket=d / "u", guest_cid=14, log_file=d / "log"
    ) as dev:
        with GuestDriver(str(d / "v"), guest_cid=14) as guest:
            guest.boot()
            assert guest.config_cid == 14
            listener = guest.listen(77)
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(10)
                c.connect(str(d / "u"))
                c.sendall(b"CONNECT 77\nhello")
                stream = guest.accept(listener)
                guest.wait_for(lambda: len(stream.rxbuf) >= 5, 10, "payload")
                assert stream.recv() == b"hello"
                assert c.recv(100).startswith(b"OK ")
        _wait_exit(dev.pid)  # --exit-on-disconnect: QEMU gone, device gone
        assert dev.process.wait(5) == 0
    assert not (d / "u").exists() and not (d / "v").exists()


# ---------------------------------------------------------------------- socket ownership
@pytest.mark.timeout(60)
def test_old_device_exit_keeps_a_new_devices_socket(tmp: str) -> None:
    """Issue 13 item 7: a VM reusing the name binds the same paths while the old device still
    runs; when the old one finally exits it must not delete the new one's sockets."""
    vpath, upath = os.path.join(tmp, "v"), os.path.join(tmp, "u")
    old = _start(vpath, upath, 12)
    old_ino = os.stat(upath).st_ino
    new = subprocess.Popen(
        [*DEVICE, "--socket", vpath, "--uds", upath, "--cid", "13"], stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(upath) or os.stat(upath).st_ino == old_ino:
            assert new.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)  # the new device binds the vhost socket first: both are replaced now
        new_ids = {p: os.stat(p).st_ino for p in (vpath, upath)}
        assert _finish(old) == 0
        assert {p: os.stat(p).st_ino for p in (vpath, upath)} == new_ids
        with GuestDriver(vpath, guest_cid=13) as g:  # and the new device still serves
            g.boot()
            assert g.config_cid == 13
    finally:
        _finish(old)
        code = _finish(new)
    assert code == 0
    assert not os.path.exists(upath) and not os.path.exists(vpath)


def test_a_device_loop_stopped_before_a_device_is_added_stops_that_device_too(tmp: str) -> None:
    """A signal that arrives while a device process is still adding its VMs is not lost: the
    loop's stop also stops the devices added after it."""
    from vsockrpc.vhost.device import DeviceLoop, VsockDevice
    from vsockrpc.vhost.reactor import Reactor

    reactor = Reactor()
    try:
        loop = DeviceLoop(reactor)
        loop.stop()
        with VsockDevice(
            vhost_socket=f"{tmp}/v", uds_path=f"{tmp}/u", guest_cid=3, reactor=reactor
        ) as device:
            loop.add(device)
            done = threading.Thread(target=loop.run, daemon=True)
            done.start()
            done.join(10)
            assert not done.is_alive(), "the loop kept serving after its stop"
            assert not loop.devices
    finally:
        reactor.close()
