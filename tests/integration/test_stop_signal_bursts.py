"""Every long-running entry point stops promptly, exit 0, on a burst of stop signals.

``vsockrpc serve``, ``vsockrpc forward``, the guest's agent server (``python -m vsockrpc.guest``)
and its command supervisor each wait on a stop event in short steps. Their signal handlers used
to call ``Event.set`` directly; Python runs a handler in the main thread between two bytecodes,
and when that was inside ``Event.wait`` holding the Event's own (non-reentrant) lock, ``set``
blocked on it forever: the process hung, signalled and unstoppable but by SIGKILL. On a loaded
machine the main thread can be descheduled right there; ``slow`` widens the window the same
way, deterministically: in the child, the main thread's ``Event.wait`` holds the Event's lock
for 50 ms of every 52 (sleeping, where a signal is handled at once). ``plain`` is the same
burst with nothing changed. A burst is SIGTERM, SIGINT and SIGHUP in turn, one every millisecond
for a second (or until the process is gone); ``once`` is a single SIGTERM, which alone hung
the entry points under ``slow`` before the fix (10 of 12 tries). Signals start once the entry
point is ready; it must exit 0 within :data:`PROMPT` and leave no socket or command behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vsockrpc.agent import markers

pytestmark = pytest.mark.timeout(120)

# Run in the child before the entry point (``slow`` only); see the module docstring.
SLOW_EVENT = textwrap.dedent(
    """
    import threading, time
    _wait = threading.Event.wait
    def _slow_wait(self, timeout=None):
        if threading.current_thread() is not threading.main_thread():
            return _wait(self, timeout)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:  # the lock Event.wait and Event.set take
                time.sleep(0.05)  # a descheduled main thread, still holding it
            step = 0.002 if end is None else max(min(0.002, end - time.monotonic()), 0)
            if _wait(self, step):
                return True
            if end is not None and time.monotonic() >= end:
                return False
    threading.Event.wait = _slow_wait
    """
)
RUN_MODULE = textwrap.dedent(
    """
    import runpy, sys
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """
)
SUPERVISE = textwrap.dedent(
    """
    import sys
    from vsockrpc.guest.supervise import Supervisor
    from vsockrpc.guest.userconfig import load
    config = load(sys.argv[1])
    sys.exit(Supervisor(config.commands, {"PATH": "/usr/bin:/bin"}).run())
    """
)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
BURST = 1.0  # seconds of signals, one every millisecond
PROMPT = 15.0  # seconds from the first signal to the exit (the longest grace inside is 5 s)
STARTUP = 90.0  # seconds to get ready (a Python start with grpc on a loaded machine)


@dataclass
class Entry:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait_ready(self, marker: str) -> str:
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            text = self.text()
            if marker in text:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"not ready ({self.proc.poll()}): {self.text()[-2000:]}")


@contextlib.contextmanager
def _entry(tmp_path: Path, slow: bool, code: str, *args: str) -> Iterator[Entry]:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as out_f, err.open("wb") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-c", (SLOW_EVENT if slow else "") + code, *args],
            stdin=subprocess.DEVNULL,
            stdout=out_f,
            stderr=err_f,
        )
    try:
        yield Entry(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _burst(proc: subprocess.Popen[bytes], stops: tuple[signal.Signals, ...]) -> float:
    """Signal ``proc`` with ``stops`` in turn, every millisecond for :data:`BURST` seconds or
    until it exits (once each for ``ONCE``); seconds from the first signal until it exited."""
    time.sleep(0.3)  # past the ready line: the main thread is in its wait loop
    start = time.monotonic()
    sent = 0
    while proc.poll() is None:  # polled, not reaped: the pid is still the child's
        if (stops is ONCE and sent) or time.monotonic() - start > BURST:
            break
        os.kill(proc.pid, stops[sent % len(stops)])
        sent += 1
        time.sleep(0.001)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(PROMPT - (time.monotonic() - start), 0.1))
    return time.monotonic() - start


def _assert_stopped(entry: Entry, took: float) -> None:
    status = entry.proc.poll()
    assert status == 0 and took < PROMPT, (
        f"exit status {status} {took:.1f} s after the first signal: {entry.text()[-2000:]}"
    )


ONCE = (signal.SIGTERM,)  # a single SIGTERM, as PID 1 or a service manager sends
MODES = [
    pytest.param(False, STOPS, id="plain-burst"),
    pytest.param(True, STOPS, id="slow-burst"),
    pytest.param(True, ONCE, id="slow-once"),
]


@pytest.mark.parametrize(("slow", "stops"), MODES)
def test_serve_stops_on_a_burst(
    tmp_path: Path, slow: bool, stops: tuple[signal.Signals, ...]
) -> None:
    sock = tmp_path / "serve.sock"
    with _entry(
        tmp_path, slow, RUN_MODULE, "vsockrpc.cli.main", "serve", "--listen", f"unix:{sock}"
    ) as entry:
        entry.wait_ready("listening on ")
        _assert_stopped(entry, _burst(entry.proc, stops))
    assert not sock.exists()


@pytest.mark.parametrize(("slow", "stops"), MODES)
def test_forward_stops_on_a_burst(
    tmp_path: Path, slow: bool, stops: tuple[signal.Signals, ...]
) -> None:
    app = tmp_path / "app.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(app))
        listener.listen()
        with _entry(
            tmp_path,
            slow,
            RUN_MODULE,
            "vsockrpc.cli.main",
            "forward",
            f"hvsock:{tmp_path}/vm.vsock:9999",
            "--expose",
            f"unix:{app}",
            "--as",
            "5000",
        ) as entry:
            entry.wait_ready("forwarding ")
            assert (tmp_path / "vm.vsock_5000").exists()
            _assert_stopped(entry, _burst(entry.proc, stops))
    assert not (tmp_path / "vm.vsock_5000").exists()


@pytest.mark.parametrize(("slow", "stops"), MODES)
def test_guest_agent_stops_on_a_burst(
    tmp_path: Path, slow: bool, stops: tuple[signal.Signals, ...]
) -> None:
    sock = tmp_path / "agent.sock"
    with _entry(tmp_path, slow, RUN_MODULE, "vsockrpc.guest", "--listen", f"unix:{sock}") as entry:
        entry.wait_ready(markers.READY)
        _assert_stopped(entry, _burst(entry.proc, stops))
        assert "stopping" in entry.text()
    assert not sock.exists()


def _alive_with(pid: int, token: str) -> bool:
    try:
        return token in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@pytest.mark.parametrize(("slow", "stops"), MODES)
def test_guest_supervisor_stops_on_a_burst(
    tmp_path: Path, slow: bool, stops: tuple[signal.Signals, ...]
) -> None:
    token = f"burst-{os.getpid()}-{time.monotonic_ns()}"  # names the command we start
    config = {
        "commands": [
            {"name": "idle", "argv": ["/bin/sh", "-c", f"sleep 600; : {token}"], "restart": "never"}
        ]
    }
    (tmp_path / "guest.json").write_text(json.dumps(config))
    child = 0
    try:
        with _entry(tmp_path, slow, SUPERVISE, str(tmp_path / "guest.json")) as entry:
            text = entry.wait_ready("command idle started (pid ")
            child = int(text.split("command idle started (pid ", 1)[1].split(")", 1)[0])
            assert _alive_with(child, token)
            _assert_stopped(entry, _burst(entry.proc, stops))
        assert not _alive_with(child, token), "the supervised command outlived the supervisor"
    finally:
        if child and _alive_with(child, token):  # its own session: the group is its pid
            os.killpg(child, signal.SIGKILL)
