"""Supervised commands: the image spec's long-running programs, started and restarted.

PID 1 forks one supervisor process (:func:`start`) when the guest config declares commands,
so PID 1 itself stays the small reaper it is. The supervisor starts every command with the
spec's environment, copies its output to the console line by line as ``[NAME] line``, reports
readiness (``vsockrpc-guest: command NAME ready`` once its vsock or TCP port accepts) and
every exit (``command NAME exited with status N``), and restarts it per policy: ``always``,
``on-failure`` (non-zero exit or a signal) or ``never``, with a doubling delay (0.5 s … 10 s)
that resets after a run of more than 10 s. SIGTERM (or SIGINT, SIGHUP) stops the commands
(SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`) and the supervisor. Standard library
only, no grpc.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from vsockrpc._stopsignals import StopSignals
from vsockrpc.agent.markers import PREFIX
from vsockrpc.guest.userconfig import CommandConfig, GuestConfig

__all__ = ["READY", "STOP_TIMEOUT", "Supervisor", "start"]

READY = "ready"  # "vsockrpc-guest: command NAME ready"
STOP_TIMEOUT = 5.0
MAX_DELAY = 10.0
STABLE_RUN = 10.0
VMADDR_CID_LOCAL = 1  # include/uapi/linux/vm_sockets.h: the guest itself (vsock_loopback)


def _say(text: str) -> None:
    print(f"{PREFIX} {text}", file=sys.stderr, flush=True)


def accepts(ready: str, timeout: float = 0.5) -> bool:
    """True when ``vsock:PORT`` (this guest, CID 1) or ``tcp:PORT`` (127.0.0.1) accepts."""
    kind, _, port = ready.partition(":")
    if kind == "vsock":
        family, address = socket.AF_VSOCK, (VMADDR_CID_LOCAL, int(port))
    else:
        family, address = socket.AF_INET, ("127.0.0.1", int(port))  # type: ignore[assignment]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(address)
        except OSError:
            return False
    return True


class _Run:
    """One command's current process and its restart state."""

    def __init__(self, command: CommandConfig) -> None:
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restarts = 0
        self.delay = 0.5
        self.next_start = 0.0
        self.ready_seen = False


class Supervisor:
    def __init__(self, commands: tuple[CommandConfig, ...], env: dict[str, str]) -> None:
        self._runs = [_Run(c) for c in commands]
        self._env = env
        self._stopping = threading.Event()

    def _spawn(self, run: _Run) -> None:
        name = run.command.name
        try:
            run.proc = subprocess.Popen(
                run.command.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )
        except OSError as err:
            _say(f"command {name} failed to start: {err.strerror or err}")
            run.proc = None
            self._schedule(run, failed=True)
            return
        run.started = time.monotonic()
        _say(f"command {name} started (pid {run.proc.pid})")
        threading.Thread(target=self._pump, args=(run.proc, name), daemon=True).start()
        if run.command.ready is not None and not run.ready_seen:
            threading.Thread(target=self._watch_ready, args=(run, run.proc), daemon=True).start()

    @staticmethod
    def _pump(proc: subprocess.Popen[bytes], name: str) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            print(f"[{name}] {line}", file=sys.stderr, flush=True)

    def _watch_ready(self, run: _Run, proc: subprocess.Popen[bytes]) -> None:
        assert run.command.ready is not None
        while not self._stopping.is_set() and proc.poll() is None:
            if accepts(run.command.ready):
                run.ready_seen = True
                _say(f"command {run.command.name} {READY} ({run.command.ready})")
                return
            time.sleep(0.1)

    def _schedule(self, run: _Run, *, failed: bool) -> bool:
        """Plan a restart per policy; False when the command stays down."""
        policy = run.command.restart
        if policy == "never" or (policy == "on-failure" and not failed):
            _say(f"command {run.command.name} not restarted (restart = {policy})")
            return False
        if run.started and time.monotonic() - run.started > STABLE_RUN:
            run.delay = 0.5
        run.next_start = time.monotonic() + run.delay
        _say(f"command {run.command.name}: restarting in {run.delay:g} s")
        run.delay = min(run.delay * 2, MAX_DELAY)
        run.restarts += 1
        return True

    def run(self) -> int:
        """Start every command and supervise until a stop signal; returns the exit status."""
        with StopSignals(absorb_after=True) as stop:
            for run in self._runs:
                self._spawn(run)
            while not stop.event.wait(0.1):
                self._poll()
            self._stopping.set()  # readiness watchers give up
            self._stop_all()
        return 0

    def _poll(self) -> None:
        """Report exits, plan restarts, start what is due."""
        for run in self._runs:
            if run.proc is not None:
                status = run.proc.poll()
                if status is None:
                    continue
                _say(f"command {run.command.name} exited with status {status}")
                run.proc = None
                if not self._schedule(run, failed=status != 0):
                    run.next_start = float("inf")
            elif time.monotonic() >= run.next_start:
                self._spawn(run)

    def _stop_all(self) -> None:
        live = [r.proc for r in self._runs if r.proc is not None and r.proc.poll() is None]
        for proc in live:
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in live:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def start(config: GuestConfig, base_env: dict[str, str]) -> int | None:
    """Fork the supervisor when ``config`` declares commands (called by PID 1); its pid."""
    if not config.commands:
        return None
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        os.setsid()
        env = {**base_env, **dict(config.env)}
        code = Supervisor(config.commands, env).run()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)
