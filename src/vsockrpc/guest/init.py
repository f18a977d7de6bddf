"""The guest's PID 1: set the system up, run the agent as a child, reap, power off.

Design (the shape of tini/dumb-init): PID 1 stays tiny and never imports grpc. It mounts the
pseudo filesystems, loads the vsock modules if the loader did not, forks the agent
(:mod:`vsockrpc.guest.server`), and then only waits: every orphan re-parented to PID 1 is
reaped by the same ``wait()`` loop, while the agent's own children stay the agent's (so
``subprocess`` in services keeps its exit codes). When the agent exits — asked to (SIGTERM
or SIGINT to PID 1, Ctrl-Alt-Del from the launcher, a shutdown RPC that signals PID 1) or
because it crashed — PID 1 stops what is left, syncs and powers off with reboot(2). PID 1
never returns: a returning init is a kernel panic.

Open files: Linux starts init with ``RLIMIT_NOFILE`` 1024/4096, and the agent inherited 1024 —
~150 idle host connections used to exhaust it. PID 1 raises soft and hard to
:data:`AGENT_OPEN_FILES` (it may: it is root) before forking the agent.

Entropy: the launcher gives TCG guests ``-cpu max`` (RDRAND), which the cloud kernel trusts
(CONFIG_RANDOM_TRUST_CPU=y), so the CRNG is ready before userspace and Python's
``os.urandom`` never blocks; PID 1 only reports the pool state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from types import FrameType

from vsockrpc._fdlimit import raise_open_files_limit
from vsockrpc.agent import markers
from vsockrpc.guest import pid1, userconfig
from vsockrpc.guest.cmdline import parse_cmdline

__all__ = ["main", "request_poweroff"]

STOP_TIMEOUT = 10.0  # seconds the agent gets after SIGTERM before SIGKILL
AGENT_OPEN_FILES = 65536  # RLIMIT_NOFILE for PID 1 and the agent (kernel default: 1024)
_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "linux",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def _say(text: str) -> None:
    print(f"{markers.PREFIX} {text}", file=sys.stderr, flush=True)


def request_poweroff() -> None:
    """Ask the guest's init for a clean power-off (for services, e.g. a shutdown RPC).

    Returns at once; PID 1 stops the agent gracefully (in-flight calls finish), then powers off.
    """
    os.kill(1, signal.SIGTERM)


def _setup() -> None:
    problems: list[str] = []
    pid1.mount_essentials(problems)
    release = os.uname().release
    loaded = pid1.load_modules(f"/usr/lib/modules/{release}/vsockrpc.load", problems)
    try:
        pid1.disable_ctrl_alt_del()
    except OSError as err:
        problems.append(str(err))
    open_files = raise_open_files_limit(AGENT_OPEN_FILES)
    if open_files < AGENT_OPEN_FILES:
        problems.append(f"open files limited to {open_files}")
    try:
        with open("/proc/sys/kernel/random/entropy_avail") as f:
            crng = f.read().strip()
    except OSError:
        crng = "?"
    for problem in problems:
        _say(f"warning: {problem}")
    _say(f"init started (kernel {release}, {loaded} modules loaded here, entropy {crng})")


def _spawn_agent(listen: tuple[str, ...]) -> int:
    pid = os.fork()
    if pid == 0:  # the agent
        code = 1
        try:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            logging.basicConfig(level=logging.INFO, format=f"{markers.PREFIX} %(message)s")
            from vsockrpc.guest.server import run_server

            code = run_server(listen)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def _supervise(agent: int) -> int:
    """Reap until the agent exits; forward stop requests. Returns the agent's exit status."""
    kill_at: list[float] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        _say(f"{signal.Signals(signum).name}: stopping the agent")
        if not kill_at:
            kill_at.append(time.monotonic() + STOP_TIMEOUT)
            signal.alarm(int(STOP_TIMEOUT) + 1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent, signal.SIGTERM)

    def overdue(_signum: int, _frame: FrameType | None) -> None:
        _say("agent did not stop in time: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent, signal.SIGKILL)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)  # Ctrl-Alt-Del with CAD off
    signal.signal(signal.SIGALRM, overdue)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        if pid == agent:
            signal.alarm(0)
            return os.waitstatus_to_exitcode(status)


def _stop_everything() -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(-1, sig)  # every process but PID 1
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
            except ChildProcessError:
                return


def main() -> None:
    """PID 1's body. Never returns when it is PID 1."""
    status = 1
    try:
        os.environ.clear()
        os.environ.update(_ENV)
        _setup()
        with open("/proc/cmdline") as f:
            config = parse_cmdline(f.read())
        user = userconfig.load()
        if user.commands:  # an image spec's commands: their own supervisor process
            from vsockrpc.guest import supervise  # subprocess, threads: only when needed

            supervise.start(user, dict(os.environ))
        status = _supervise(_spawn_agent(config.listen))
        _say(f"agent exited with status {status}")
    except BaseException:
        traceback.print_exc()
        _say("init failed")
    finally:
        try:
            _stop_everything()
            _say(f"powering off (status {status})")
            pid1.power_off()
        except BaseException:
            traceback.print_exc()
        # reboot(2) failed: there is nothing left to do but wait (exiting would panic).
        while True:
            signal.pause()
