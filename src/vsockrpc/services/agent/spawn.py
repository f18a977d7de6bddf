"""Starting processes for the agent: a :class:`ProcessSpec` checked, resolved and spawned into
a :class:`ProcessTable` (no gRPC; failures are :class:`~._status.Status`).

Processes run in their own session (``setsid``) so signals and timeouts reach the whole group.
Switching user and giving a PTY process its controlling terminal are done by util-linux
``setpriv``/``setsid`` in the child rather than in a ``preexec_fn`` (see the helpers' notes).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import pwd
import shutil
import subprocess
import threading
from dataclasses import dataclass, field

from vsockrpc.agent import WINDOW_MAX
from vsockrpc.services.agent._status import Code, Status, check_path, from_os_error, show
from vsockrpc.services.agent.process import ManagedProcess, claim_child, set_window

__all__ = ["DEFAULT_PATH", "MAX_PROCESSES", "ProcessSpec", "ProcessTable"]

log = logging.getLogger("vsockrpc.agent.exec")

MAX_PROCESSES = 1024
DEFAULT_PATH = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ProcessSpec:
    """What to start (the fields of ``ExecStart``; see ``agent.proto``)."""

    argv: list[bytes]
    env: list[bytes] = field(default_factory=list)  # "NAME=value" entries
    inherit_env: bool = False
    cwd: bytes = b""  # empty: "/"
    user: str = ""  # name or numeric uid; empty: the agent's user
    timeout: float = 0.0  # > 0: SIGKILL the group after this many seconds
    pty: bool = False
    window: tuple[int, int] = (0, 0)  # rows, cols (0: 24x80)
    term: str = ""
    keep_alive: bool = False


def _ctty_wrapper() -> bytes | None:
    """util-linux ``setsid``, used to give PTY processes a controlling terminal.

    A PTY process must call setsid() and ioctl(TIOCSCTTY) between fork and exec. Doing that in a
    ``preexec_fn`` forks the whole grpcio process through Python's at-fork machinery, which
    crashes the child (SIGSEGV) while gRPC threads run; ``setsid --ctty`` does it in the child
    instead (it does not fork when the caller is not a group leader, so the pid stays ours).
    """
    found = shutil.which("setsid")
    return os.fsencode(found) if found else None


def _setpriv_prefix(account: pwd.struct_passwd) -> list[bytes]:
    """util-linux ``setpriv`` switching to ``account`` (uid, gid and its groups) before exec.

    Popen's own ``user=``/``group=`` make CPython fork through its at-fork handlers, which
    crashes the child of a process running gRPC threads; setpriv switches in the child instead.
    """
    found = shutil.which("setpriv")
    if found is None:
        raise Status(Code.FAILED_PRECONDITION, "running as another user needs setpriv(1)")
    return [
        os.fsencode(found),
        f"--reuid={account.pw_uid}".encode(),
        f"--regid={account.pw_gid}".encode(),
        b"--init-groups",
        b"--",
    ]


def _resolve_user(user: str) -> pwd.struct_passwd | None:
    if not user:
        return None
    # ASCII digits only: str.isdigit() also takes "\u00b2" (int() then fails) and a fullwidth
    # zero, "\uff10", which int() read as uid 0.
    numeric = user.isascii() and user.isdigit()
    try:
        return pwd.getpwuid(int(user)) if numeric else pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):  # ValueError: a NUL in the name
        raise Status(Code.INVALID_ARGUMENT, f"unknown user {show(user)}") from None


def _resolve_executable(arg0: bytes, cwd: bytes, path_var: bytes) -> bytes:
    """The file execve should run for ``arg0``; NOT_FOUND / PERMISSION_DENIED when it can't."""
    if b"/" in arg0:
        candidate = arg0 if arg0.startswith(b"/") else os.path.join(cwd, arg0)
        try:
            st = os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            raise Status(Code.NOT_FOUND, f"no such file: {show(arg0)}") from None
        if (
            not os.path.isfile(candidate)
            or not st.st_mode & 0o111
            or not os.access(candidate, os.X_OK)
        ):
            raise Status(Code.PERMISSION_DENIED, f"not executable: {show(arg0)}")
        return candidate
    blocked = None
    for directory in path_var.split(b":"):
        candidate = os.path.join(directory or b".", arg0)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK) and os.stat(candidate).st_mode & 0o111:
                return candidate
            blocked = blocked or candidate
    if blocked is not None:
        raise Status(Code.PERMISSION_DENIED, f"not executable: {show(blocked)}")
    raise Status(Code.NOT_FOUND, f"command not found: {show(arg0)}")


def _build_env(spec: ProcessSpec, account: pwd.struct_passwd | None) -> dict[bytes, bytes]:
    env: dict[bytes, bytes] = dict(os.environb) if spec.inherit_env else {}
    if account is not None:
        env.update(
            {
                b"HOME": os.fsencode(account.pw_dir),
                b"USER": os.fsencode(account.pw_name),
                b"LOGNAME": os.fsencode(account.pw_name),
            }
        )
    env.setdefault(b"PATH", DEFAULT_PATH)
    if spec.pty:
        env[b"TERM"] = spec.term.encode() if spec.term else b"xterm-256color"
    for entry in spec.env:
        name, sep, value = entry.partition(b"=")
        if not sep or not name or b"\0" in entry:
            raise Status(
                Code.INVALID_ARGUMENT, f"environment entry {show(entry[:64])} is not NAME=value"
            )
        env[name] = value
    return env


def _check_argv(argv: list[bytes]) -> None:
    if not argv:
        raise Status(Code.INVALID_ARGUMENT, "argv is empty: no program to run")
    if not argv[0]:
        raise Status(Code.INVALID_ARGUMENT, "the program name (argv[0]) is empty")
    if any(b"\0" in arg for arg in argv):
        raise Status(Code.INVALID_ARGUMENT, "argv contains a NUL byte")


def _check_cwd(raw: bytes) -> bytes:
    cwd = check_path(raw or b"/", "cwd")
    try:
        if not os.path.isdir(cwd):
            exists = os.path.exists(cwd)
            what = "not a directory" if exists else "no such directory"
            raise Status(
                Code.INVALID_ARGUMENT if exists else Code.NOT_FOUND, f"cwd {show(cwd)}: {what}"
            )
    except ValueError as err:
        raise Status(Code.INVALID_ARGUMENT, f"cwd: {err}") from err
    return cwd


def _popen(
    spec: ProcessSpec,
    spawn_argv: list[bytes],
    *,
    wrapped: bool,
    cwd: bytes,
    env: dict[bytes, bytes],
) -> tuple[subprocess.Popen[bytes], int | None]:
    """Start the process: on a new PTY (returns its master fd) or on three pipes.

    ``spawn_argv`` starts with the resolved executable (or a ``setpriv`` prefix when
    ``wrapped``); without a wrapper, execve gets the caller's own argv[0].
    """
    if not spec.pty:
        popen = subprocess.Popen(
            spawn_argv if wrapped else spec.argv,
            executable=spawn_argv[0],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        return popen, None
    master_fd, slave_fd = os.openpty()
    try:
        os.set_inheritable(master_fd, False)
        set_window(slave_fd, *spec.window)
        wrapper = _ctty_wrapper()
        if wrapper is not None:
            spawn_argv = [wrapper, b"--ctty", b"--", *spawn_argv]
        else:  # no controlling terminal: output and input still work, ^C does not
            log.warning("setsid(1) not found: PTY process gets no controlling terminal")
        popen = subprocess.Popen(
            spawn_argv,
            stdin=slave_fd,
            stdout=slave_fd,
            stderr=slave_fd,
            cwd=cwd,
            env=env,
            start_new_session=wrapper is None,
        )
    except BaseException:
        os.close(master_fd)
        raise
    finally:
        os.close(slave_fd)
    return popen, master_fd


class ProcessTable:
    """The agent's processes by id; also the factory that validates and spawns them."""

    def __init__(self, *, max_processes: int = MAX_PROCESSES) -> None:
        self._lock = threading.Lock()
        self._processes: dict[str, ManagedProcess] = {}
        self._max = max_processes

    def get(self, process_id: str) -> ManagedProcess:
        with self._lock:
            proc = self._processes.get(process_id)
        if proc is None:
            raise Status(Code.NOT_FOUND, f"no process {show(process_id)}")
        return proc

    def list(self) -> list[ManagedProcess]:
        with self._lock:
            return list(self._processes.values())

    def _forget(self, proc: ManagedProcess) -> None:
        with self._lock:
            self._processes.pop(proc.process_id, None)

    def spawn(self, spec: ProcessSpec) -> ManagedProcess:
        argv = list(spec.argv)
        _check_argv(argv)
        with self._lock:
            if len(self._processes) >= self._max:
                raise Status(Code.RESOURCE_EXHAUSTED, f"{self._max} processes already running")
        cwd = _check_cwd(spec.cwd)
        account = _resolve_user(spec.user)
        env = _build_env(spec, account)
        executable = _resolve_executable(argv[0], cwd, env.get(b"PATH", DEFAULT_PATH))
        rows, cols = spec.window
        if not (0 <= rows <= WINDOW_MAX and 0 <= cols <= WINDOW_MAX):  # 0: the 24x80 default
            raise Status(Code.INVALID_ARGUMENT, f"invalid window size {rows}x{cols}")
        if not (math.isfinite(spec.timeout) and spec.timeout >= 0):  # NaN: no deadline at all
            raise Status(
                Code.INVALID_ARGUMENT,
                f"timeout_seconds must be a finite number, 0 (none) or more, not {spec.timeout!r}",
            )
        wrapped = account is not None and account.pw_uid != os.geteuid()
        spawn_argv: list[bytes] = [executable, *argv[1:]]
        if account is not None and wrapped:
            spawn_argv = [*_setpriv_prefix(account), *spawn_argv]
        try:
            popen, master_fd = _popen(spec, spawn_argv, wrapped=wrapped, cwd=cwd, env=env)
        except OSError as err:
            if err.errno == errno.E2BIG:
                raise Status(Code.INVALID_ARGUMENT, "argument list too long (E2BIG)") from err
            raise from_os_error(err, f"cannot execute {show(argv[0])}") from err
        except (ValueError, TypeError) as err:
            raise Status(Code.INVALID_ARGUMENT, str(err)) from err
        claim_child(popen.pid)
        import uuid  # here, not at the top: uuid imports platform (guest boot time under TCG)

        process_id = uuid.uuid4().hex
        proc = ManagedProcess(
            process_id,
            popen,
            argv,
            master_fd=master_fd,
            keep_alive=spec.keep_alive,
            timeout=spec.timeout,
            on_finished=self._forget,
        )
        with self._lock:
            self._processes[process_id] = proc
        log.info("started %s as pid %d (id %s)", show(argv[0]), popen.pid, process_id)
        return proc

    def close(self, timeout: float = 5.0) -> None:
        """Kill every process still running (agent shutdown, tests)."""
        for proc in self.list():
            proc.kill_and_wait(timeout)
