"""The System service: ping, info, time sync from the host, a clone's fresh identity, power off
/ reboot.

Power control is a seam: :data:`PowerControl` is any callable taking a :class:`PowerAction`.
The guest's PID-1 init installs its own with :func:`install_power_control` (so it can stop
services, sync and unmount before ``reboot(2)``); without one, :func:`default_power_control`
calls ``reboot(2)`` directly when the agent is PID 1 and ``systemctl``/``poweroff`` otherwise.
The action runs on a thread after the RPC's reply has been sent.
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc

from vsockrpc import __version__
from vsockrpc.agent import VM_NAME
from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.services.agent._rpc import abort, statuses
from vsockrpc.services.agent._status import Code, Status, show

log = logging.getLogger("vsockrpc.agent.system")


class PowerAction(enum.Enum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"


PowerControl = Callable[[PowerAction], None]
"""Carries out a power action; may return (the machine goes down shortly) or never return."""

ClockSetter = Callable[[int], None]
"""Sets CLOCK_REALTIME to the given nanoseconds since the epoch."""

IdentitySetter = Callable[[bytes, str, str], None]
"""Given (seed, hostname, machine_id), makes this machine distinct from its fellow clones."""

# Refresh's input bounds (agent.proto RefreshRequest).
MIN_SEED, MAX_SEED = 16, 4096
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")  # machine-id(5)
_POWER_ACTIONS = {
    pb.POWER_ACTION_UNSPECIFIED: PowerAction.POWEROFF,  # agent.proto: unspecified = power off
    pb.POWER_ACTION_POWEROFF: PowerAction.POWEROFF,
    pb.POWER_ACTION_REBOOT: PowerAction.REBOOT,
}
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07), include/uapi/linux/random.h
_MS_BIND = 4096  # include/uapi/linux/mount.h

# reboot(2) magic numbers, <linux/reboot.h>.
_LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
_LINUX_REBOOT_CMD_RESTART = 0x01234567

_installed_power_control: PowerControl | None = None


def install_power_control(control: PowerControl | None) -> None:
    """Make ``control`` the power hook of every SystemServicer built without one (PID-1 init)."""
    global _installed_power_control
    _installed_power_control = control


def _reboot_syscall(action: PowerAction) -> None:
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    cmd = _LINUX_REBOOT_CMD_RESTART if action is PowerAction.REBOOT else _LINUX_REBOOT_CMD_POWER_OFF
    if libc.reboot(ctypes.c_int(cmd)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _init_is_vsockrpc() -> bool:
    """PID 1 is vsockrpc's guest init, which runs the agent as its (forked) child."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            if b"vsockrpc" in f.read():
                return True
        # A bundle used as init= under another file name: PID 1 is our interpreter and parent.
        return os.getppid() == 1 and os.path.realpath("/proc/1/exe") == os.path.realpath(
            sys.executable
        )
    except OSError:
        return False


def default_power_control(action: PowerAction) -> None:
    """Power the guest off or reboot it, whoever the init is.

    * the agent is PID 1 (e.g. the bundle as ``init=``): sync and ``reboot(2)``;
    * PID 1 is vsockrpc's init (the agent is its child): SIGTERM to PID 1, which stops the
      agent gracefully, syncs and powers off (``vsockrpc.guest.init.request_poweroff``);
      that init cannot reboot, see :func:`can_carry_out`;
    * any other init: ``systemctl poweroff|reboot`` or ``poweroff``/``reboot``.
    """
    if os.getpid() == 1:
        _reboot_syscall(action)
        return
    if _init_is_vsockrpc():
        os.kill(1, signal.SIGTERM)
        return
    argv = ["systemctl", action.value] if shutil.which("systemctl") else [action.value]
    subprocess.run(argv, check=True, timeout=60)


def can_carry_out(action: PowerAction) -> bool:
    """Whether :func:`default_power_control` can do ``action`` on this system."""
    return not (action is PowerAction.REBOOT and os.getpid() != 1 and _init_is_vsockrpc())


def set_realtime_clock(time_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)


def refresh_machine_identity(seed: bytes, hostname: str, machine_id: str) -> None:
    """Make a restored clone its own machine (clones of one snapshot share the RAM it held).

    * RNG: ``seed`` is written to ``/dev/urandom`` (mixed into the input pool) and the
      ``RNDRESEEDCRNG`` ioctl rekeys the CRNG from that pool at once (``drivers/char/random.c``;
      every per-CPU key follows on its next use): without it the clones' ``/dev/urandom``
      outputs would be identical. (The guest kernel here has no ``vmgenid`` driver.)
    * hostname: ``sethostname(2)``.
    * ``/etc/machine-id``, when the image has one: a fresh one written to ``/run`` and bind
      mounted over it (the root file system is read-only).
    """
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, seed)
        fcntl.ioctl(fd, _RNDRESEEDCRNG)
    finally:
        os.close(fd)
    socket.sethostname(hostname)
    if os.path.exists("/etc/machine-id"):
        with open("/run/machine-id", "w", encoding="ascii") as f:
            f.write(machine_id + "\n")
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"/run/machine-id", b"/etc/machine-id", None, _MS_BIND, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bind mount over /etc/machine-id: {os.strerror(err)}")


def _check_time_ns(time_ns: int) -> None:
    if time_ns <= 0:
        raise Status(Code.INVALID_ARGUMENT, "time_ns must be positive")


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return values


def _uptime() -> float:
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.clock_gettime(time.CLOCK_BOOTTIME)


def _os_release() -> dict[str, str]:
    try:
        import platform  # only here: Info is rare, the agent's start is not

        return platform.freedesktop_os_release()
    except OSError:
        return {}


class SystemServicer(pb_grpc.SystemServicer):
    """``vsockrpc.agent.v1.System``; clock and power are injectable for tests and for init."""

    def __init__(
        self,
        *,
        power_control: PowerControl | None = None,
        clock_setter: ClockSetter = set_realtime_clock,
        identity_setter: IdentitySetter = refresh_machine_identity,
        power_delay: float = 0.2,
    ) -> None:
        self._power_control = power_control
        self._clock_setter = clock_setter
        self._identity_setter = identity_setter
        self._power_delay = power_delay
        self._power_lock = threading.Lock()
        self._power_requested = False

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        return pb.PingResponse(payload=request.payload, time_ns=time.time_ns())

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        uname = os.uname()
        release = _os_release()
        mem = _meminfo()
        return pb.InfoResponse(
            agent_version=__version__,
            kernel_release=uname.release,
            kernel_version=uname.version,
            machine=uname.machine,
            hostname=uname.nodename,
            os_pretty_name=release.get("PRETTY_NAME", ""),
            os_release=release,
            cpus=os.cpu_count() or 0,
            memory_total_bytes=mem.get("MemTotal", 0),
            memory_available_bytes=mem.get("MemAvailable", 0),
            uptime_seconds=_uptime(),
            time_ns=time.time_ns(),
            agent_pid=os.getpid(),
            python_version="{}.{}.{}".format(*sys.version_info[:3]),
        )

    def SetTime(
        self, request: pb.SetTimeRequest, context: grpc.ServicerContext
    ) -> pb.SetTimeResponse:
        with statuses(context, "SetTime"):
            _check_time_ns(request.time_ns)
            previous = self._set_clock(request.time_ns)
            return pb.SetTimeResponse(previous_time_ns=previous, time_ns=time.time_ns())
        raise AssertionError("unreachable")  # pragma: no cover

    def _set_clock(self, time_ns: int) -> int:
        """Set the clock to the host's ``time_ns`` (checked); the guest's time just before."""
        previous = time.time_ns()
        self._clock_setter(time_ns)
        log.info("clock set from the host: moved by %+.3f s", (time_ns - previous) / 1e9)
        return previous

    def Refresh(
        self, request: pb.RefreshRequest, context: grpc.ServicerContext
    ) -> pb.RefreshResponse:
        """One call where a clone used to need a ``python3`` started through Exec (about a
        second under TCG): the agent does the work itself."""
        with statuses(context, "Refresh"):
            if not MIN_SEED <= len(request.seed) <= MAX_SEED:
                raise Status(Code.INVALID_ARGUMENT, f"seed must be {MIN_SEED} to {MAX_SEED} bytes")
            if not VM_NAME.fullmatch(request.hostname):
                raise Status(Code.INVALID_ARGUMENT, f"bad hostname {show(request.hostname)}")
            if not _MACHINE_ID.fullmatch(request.machine_id):
                raise Status(Code.INVALID_ARGUMENT, "machine_id must be 32 lowercase hex digits")
            _check_time_ns(request.time_ns)  # everything checked before anything changes
            self._identity_setter(request.seed, request.hostname, request.machine_id)
            log.info("fresh identity: %s", request.hostname)
            return pb.RefreshResponse(previous_time_ns=self._set_clock(request.time_ns))
        raise AssertionError("unreachable")  # pragma: no cover

    def Shutdown(
        self, request: pb.ShutdownRequest, context: grpc.ServicerContext
    ) -> pb.ShutdownResponse:
        if request.action not in _POWER_ACTIONS:  # an unknown value used to power off
            abort(context, Code.INVALID_ARGUMENT, f"unknown power action {request.action}")
        action = _POWER_ACTIONS[request.action]
        control = self._power_control or _installed_power_control or default_power_control
        if control is default_power_control and not can_carry_out(action):
            abort(
                context,
                Code.UNIMPLEMENTED,
                f"this guest's init cannot {action.value}; power it off and boot it again",
            )
        with self._power_lock:
            if self._power_requested:
                return pb.ShutdownResponse()
            self._power_requested = True
        log.warning("%s requested by the host", action.value)

        def later() -> None:
            time.sleep(self._power_delay)  # let the reply reach the host first
            try:
                control(action)
            except Exception:
                log.exception("%s failed", action.value)
                with self._power_lock:
                    self._power_requested = False

        # add_callback runs when the RPC is done (reply sent); the thread then waits a little.
        context.add_callback(
            lambda: threading.Thread(target=later, name="agent-power", daemon=True).start()
        )
        return pb.ShutdownResponse()
