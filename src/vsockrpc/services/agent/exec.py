"""The Exec service: processes started, streamed, signalled and re-attached by id.

Design (one :class:`ManagedProcess` per started process):

* A *pump* thread polls the process's output fds (two pipes, or the PTY master) plus a pidfd,
  reads chunks of at most :data:`CHUNK_SIZE` and puts events into a bounded queue
  (:data:`QUEUE_DEPTH` events). When the queue is full the pump blocks, stops reading, the pipe
  fills and the process blocks in ``write``: output is flow-controlled end to end (gRPC's HTTP/2
  window → our queue → the pipe), and the agent's memory stays bounded whatever the process
  writes.
* Nothing is lost at exit: after the pidfd reports the exit, the pump keeps reading until the
  pipes are drained (a pipe write is complete before ``exit``), then reaps the process and queues
  the ``exited`` event last.
* The gRPC stream attached to the process takes events from the queue. When the stream ends
  before ``exited``: with ``keep_alive`` the process keeps running (its output waits in the queue,
  back-pressure pausing it) for a later ``attach``; otherwise its process group is killed.
* Processes run in their own session (``setsid``) so signals and timeouts reach the whole group.

Reaping: the pump reaps its own child with ``waitid(P_PID)``. A PID-1 init that reaps with
``waitpid(-1)`` in the same process must hand every status it collects to
:func:`record_reaped`, so an agent child reaped there still reports its real exit status.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import queue
import select
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from vsockrpc.proto.agent.v1 import agent_pb2 as pb
from vsockrpc.proto.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.services.agent._status import Status, check_path, from_os_error, show, statuses

log = logging.getLogger("vsockrpc.agent.exec")

CHUNK_SIZE = 64 * 1024
"""Largest output chunk per event (one read)."""
QUEUE_DEPTH = 16
"""Events buffered per process: at most QUEUE_DEPTH * CHUNK_SIZE bytes of output held."""
MAX_PROCESSES = 1024
DEFAULT_PATH = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PTY_DRAIN_GRACE = 0.2
"""Seconds of silence after exit before a PTY still held open by a descendant is given up."""

_INVALID = grpc.StatusCode.INVALID_ARGUMENT

# Statuses collected by someone else's waitpid(-1) (a PID-1 reaper), by pid.
_reaped_lock = threading.Condition()
_reaped: dict[int, int] = {}
_owned_pids: set[int] = set()


def record_reaped(pid: int, wait_status: int) -> None:
    """Hand the agent a child status that a PID-1 reaper collected with ``waitpid(-1)``.

    Harmless for pids the agent does not own (they are ignored).
    """
    with _reaped_lock:
        if pid in _owned_pids:
            _reaped[pid] = os.waitstatus_to_exitcode(wait_status)
            _reaped_lock.notify_all()


def is_agent_child(pid: int) -> bool:
    """True while ``pid`` is a process this agent started and has not reaped yet."""
    with _reaped_lock:
        return pid in _owned_pids


def _set_window(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows or 24, cols or 80, 0, 0))


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
        raise Status(
            grpc.StatusCode.FAILED_PRECONDITION, "running as another user needs setpriv(1)"
        )
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
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise Status(_INVALID, f"unknown user {user!r}") from None


def _resolve_executable(arg0: bytes, cwd: bytes, path_var: bytes) -> bytes:
    """The file execve should run for ``arg0``; NOT_FOUND / PERMISSION_DENIED when it can't."""
    if b"/" in arg0:
        candidate = arg0 if arg0.startswith(b"/") else os.path.join(cwd, arg0)
        try:
            st = os.stat(candidate)
        except FileNotFoundError:
            raise Status(grpc.StatusCode.NOT_FOUND, f"no such file: {show(arg0)}") from None
        except NotADirectoryError:
            raise Status(grpc.StatusCode.NOT_FOUND, f"no such file: {show(arg0)}") from None
        if (
            not os.path.isfile(candidate)
            or not st.st_mode & 0o111
            or not os.access(candidate, os.X_OK)
        ):
            raise Status(grpc.StatusCode.PERMISSION_DENIED, f"not executable: {show(arg0)}")
        return candidate
    blocked = None
    for directory in path_var.split(b":"):
        candidate = os.path.join(directory or b".", arg0)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK) and os.stat(candidate).st_mode & 0o111:
                return candidate
            blocked = blocked or candidate
    if blocked is not None:
        raise Status(grpc.StatusCode.PERMISSION_DENIED, f"not executable: {show(blocked)}")
    raise Status(grpc.StatusCode.NOT_FOUND, f"command not found: {show(arg0)}")


def _build_env(start: pb.ExecStart, account: pwd.struct_passwd | None) -> dict[bytes, bytes]:
    env: dict[bytes, bytes] = dict(os.environb) if start.inherit_env else {}
    if account is not None:
        env.update(
            {
                b"HOME": os.fsencode(account.pw_dir),
                b"USER": os.fsencode(account.pw_name),
                b"LOGNAME": os.fsencode(account.pw_name),
            }
        )
    env.setdefault(b"PATH", DEFAULT_PATH)
    if start.pty:
        env[b"TERM"] = start.term.encode() if start.term else b"xterm-256color"
    for entry in start.env:
        name, sep, value = entry.partition(b"=")
        if not sep or not name or b"\0" in entry:
            raise Status(_INVALID, f"environment entry {show(entry[:64])} is not NAME=value")
        env[name] = value
    return env


class ManagedProcess:
    """One process started by the agent: its fds, pump thread and bounded event queue."""

    def __init__(
        self,
        process_id: str,
        popen: subprocess.Popen[bytes],
        argv: list[bytes],
        *,
        master_fd: int | None,
        keep_alive: bool,
        timeout: float,
        on_finished: Callable[[ManagedProcess], None],
    ) -> None:
        self.process_id = process_id
        self.popen = popen
        self.pid = popen.pid
        self.argv = argv
        self.pty = master_fd is not None
        self.keep_alive = keep_alive
        self._master_fd = master_fd
        self._events: queue.Queue[pb.ExecEvent] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._lock = threading.Lock()
        self._stdin_lock = threading.Lock()
        self._stdin_closed = False
        self._attached = False
        self._abandoned = threading.Event()
        self._running = True
        self._delivered_exit = False
        self._timed_out = False
        self._deadline = time.monotonic() + timeout if timeout > 0 else None
        self._on_finished = on_finished
        self._pump_done = threading.Event()
        self._pidfd = os.pidfd_open(self.pid)
        self._thread = threading.Thread(
            target=self._pump, name=f"exec-pump-{process_id[:8]}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        return self._running

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> None:
        with self._lock:
            if self._attached:
                raise Status(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"process {self.process_id} already has a stream attached",
                )
            if self._abandoned.is_set() or self._delivered_exit:
                raise Status(grpc.StatusCode.NOT_FOUND, f"no process {self.process_id}")
            self._attached = True

    def detach(self, *, finished: bool) -> None:
        """The attached stream ended; ``finished`` when it delivered ``exited``."""
        with self._lock:
            self._attached = False
            if finished:
                self._delivered_exit = True
            elif not self.keep_alive:
                self._abandoned.set()
        if finished:
            self._on_finished(self)
        elif not self.keep_alive:
            log.info("stream of process %s (pid %d) ended: killing it", self.process_id, self.pid)
            self.signal(signal.SIGKILL)
            self._drain_abandoned()

    def _drain_abandoned(self) -> None:
        # Nobody will read the queue again: empty it so a blocked pump can finish.
        with contextlib.suppress(queue.Empty):
            while True:
                self._events.get_nowait()

    def next_event(self, stop: threading.Event) -> pb.ExecEvent | None:
        """The next event, or None once ``stop`` is set (the stream went away)."""
        while True:
            try:
                return self._events.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return None

    # ------------------------------------------------------------------ input

    def write_stdin(self, data: bytes) -> None:
        """Blocking write (back-pressure to the client when the process doesn't read)."""
        with self._stdin_lock:
            if self._stdin_closed:
                return
            fd = self._master_fd if self._master_fd is not None else self._stdin_fd()
            view = memoryview(data)
            try:
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            except (BrokenPipeError, OSError) as err:
                log.debug("stdin of %s: %s", self.process_id, err)

    def _stdin_fd(self) -> int:
        assert self.popen.stdin is not None
        return self.popen.stdin.fileno()

    def close_stdin(self) -> None:
        with self._stdin_lock:
            if self._stdin_closed:
                return
            if self._master_fd is not None:
                # A PTY has no half-close: send the line discipline's EOF character (VEOF).
                with contextlib.suppress(OSError):
                    eof = termios.tcgetattr(self._master_fd)[6][termios.VEOF]
                    os.write(self._master_fd, eof if isinstance(eof, bytes) else b"\x04")
                return
            self._stdin_closed = True
            if self.popen.stdin is not None:
                with contextlib.suppress(OSError):
                    self.popen.stdin.close()

    def signal(self, signum: int) -> None:
        if not 1 <= signum < signal.NSIG:
            raise Status(_INVALID, f"invalid signal number {signum}")
        with self._lock:
            if not self._running:
                return
            # The pid is not reaped yet (the pump reaps after the pidfd fires), so the process
            # group id cannot have been reused.
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                # Not a group leader yet: `setsid --ctty` (PTY mode) has not run setsid().
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(self.pid, signum)
            except PermissionError:
                pass

    def resize(self, rows: int, cols: int) -> None:
        if self._master_fd is None:
            raise Status(grpc.StatusCode.FAILED_PRECONDITION, "resize needs a PTY (pty=true)")
        if not (0 < rows < 65536 and 0 < cols < 65536):
            raise Status(_INVALID, f"invalid window size {rows}x{cols}")
        with contextlib.suppress(OSError):
            _set_window(self._master_fd, rows, cols)  # the kernel sends SIGWINCH

    # ------------------------------------------------------------------ pump

    def _emit(self, event: pb.ExecEvent) -> None:
        while not self._abandoned.is_set():
            self._check_deadline()
            try:
                self._events.put(event, timeout=0.1)
                return
            except queue.Full:
                continue

    def _check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._deadline = None
            self._timed_out = True
            log.info("process %s (pid %d) timed out: killing it", self.process_id, self.pid)
            self.signal(signal.SIGKILL)

    def _output_fds(self) -> dict[int, str]:
        if self._master_fd is not None:
            return {self._master_fd: "stdout"}
        assert self.popen.stdout is not None and self.popen.stderr is not None
        return {self.popen.stdout.fileno(): "stdout", self.popen.stderr.fileno(): "stderr"}

    def _pump(self) -> None:
        try:
            self._pump_output()
            returncode = self._reap()
            exited = pb.ExecExited(timed_out=self._timed_out)
            if returncode >= 0:
                exited.exit_code = returncode
            else:
                exited.signal = -returncode
            log.info("process %s (pid %d) exited: %s", self.process_id, self.pid, returncode)
            self._emit(pb.ExecEvent(exited=exited))
        except Exception:  # a bug here must not take the agent down; log it loudly
            log.exception("exec pump of %s failed", self.process_id)
        finally:
            self._close_fds()
            self._pump_done.set()
            if self._abandoned.is_set():
                self._on_finished(self)

    def _pump_output(self) -> None:
        fds = self._output_fds()
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        poller.register(self._pidfd, select.POLLIN)
        exited_at: float | None = None
        while fds:
            if exited_at is None:
                timeout_ms = None
                if self._deadline is not None:
                    timeout_ms = max(0, int((self._deadline - time.monotonic()) * 1000) + 1)
            else:
                # After exit: pipes hold everything the process wrote, so drain what is there
                # (timeout 0). A PTY's line discipline forwards asynchronously: allow a grace.
                timeout_ms = int(PTY_DRAIN_GRACE * 1000) if self.pty else 0
            ready = poller.poll(timeout_ms)
            self._check_deadline()
            if not ready and exited_at is not None:
                break
            for fd, _mask in ready:
                if fd == self._pidfd:
                    exited_at = time.monotonic()
                    poller.unregister(self._pidfd)
                    continue
                try:
                    data = os.read(fd, CHUNK_SIZE)
                except OSError:  # EIO on a PTY master once every slave fd is closed
                    data = b""
                if not data:
                    poller.unregister(fd)
                    del fds[fd]
                    continue
                if fds[fd] == "stdout":
                    self._emit(pb.ExecEvent(stdout=data))
                else:
                    self._emit(pb.ExecEvent(stderr=data))
        if exited_at is None:
            # Output closed before exit: wait for the exit itself (still honouring the timeout).
            while True:
                remaining = None
                if self._deadline is not None:
                    remaining = max(0.0, self._deadline - time.monotonic())
                ready_fds, _, _ = select.select([self._pidfd], [], [], remaining)
                if ready_fds:
                    break
                self._check_deadline()

    def _reap(self) -> int:
        try:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED)
        except ChildProcessError:
            # A PID-1 reaper got there first: it hands the status over via record_reaped().
            with _reaped_lock:
                _reaped_lock.wait_for(lambda: self.pid in _reaped, timeout=5.0)
                returncode = _reaped.pop(self.pid, None)
            if returncode is None:
                log.warning("exit status of pid %d was reaped elsewhere and lost", self.pid)
                returncode = -signal.SIGKILL if self._timed_out else 255
        else:
            assert result is not None
            returncode = result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
        with self._lock:
            self._running = False
        with _reaped_lock:
            _owned_pids.discard(self.pid)
        self.popen.returncode = returncode  # keeps Popen from waiting or warning later
        return returncode

    def _close_fds(self) -> None:
        with self._stdin_lock:
            self._stdin_closed = True
            for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            if self._master_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._master_fd)
                self._master_fd = None
        with contextlib.suppress(OSError):
            os.close(self._pidfd)

    def kill_and_wait(self, timeout: float) -> None:
        self._abandoned.set()
        self.signal(signal.SIGKILL)
        self._drain_abandoned()
        self._pump_done.wait(timeout)
        self._thread.join(timeout)


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
            raise Status(grpc.StatusCode.NOT_FOUND, f"no process {process_id!r}")
        return proc

    def list(self) -> list[ManagedProcess]:
        with self._lock:
            return list(self._processes.values())

    def _forget(self, proc: ManagedProcess) -> None:
        with self._lock:
            self._processes.pop(proc.process_id, None)

    def spawn(self, start: pb.ExecStart) -> ManagedProcess:
        argv = list(start.argv)
        if not argv or not argv[0]:
            raise Status(_INVALID, "argv is empty")
        if any(b"\0" in arg for arg in argv):
            raise Status(_INVALID, "argv contains a NUL byte")
        with self._lock:
            if len(self._processes) >= self._max:
                raise Status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self._max} processes already running"
                )
        cwd = check_path(start.cwd or b"/", "cwd")
        try:
            if not os.path.isdir(cwd):
                what = "not a directory" if os.path.exists(cwd) else "no such directory"
                code = _INVALID if os.path.exists(cwd) else grpc.StatusCode.NOT_FOUND
                raise Status(code, f"cwd {show(cwd)}: {what}")
        except ValueError as err:
            raise Status(_INVALID, f"cwd: {err}") from err
        account = _resolve_user(start.user)
        env = _build_env(start, account)
        executable = _resolve_executable(argv[0], cwd, env.get(b"PATH", DEFAULT_PATH))
        if start.timeout_seconds < 0:
            raise Status(_INVALID, "timeout_seconds is negative")
        master_fd: int | None = None
        slave_fd: int | None = None
        # Without wrappers, execve gets the caller's argv[0] and the resolved executable.
        wrapped = account is not None and account.pw_uid != os.geteuid()
        spawn_argv: list[bytes] = [executable, *argv[1:]]
        if account is not None and wrapped:
            spawn_argv = [*_setpriv_prefix(account), *spawn_argv]
        try:
            if start.pty:
                master_fd, slave_fd = os.openpty()
                os.set_inheritable(master_fd, False)
                _set_window(slave_fd, start.window.rows, start.window.cols)
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
            else:
                popen = subprocess.Popen(
                    spawn_argv if wrapped else argv,
                    executable=spawn_argv[0],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
        except OSError as err:
            if master_fd is not None:
                os.close(master_fd)
            if err.errno == errno.E2BIG:
                raise Status(_INVALID, "argument list too long (E2BIG)") from err
            raise from_os_error(err, f"cannot execute {show(argv[0])}") from err
        except (ValueError, TypeError) as err:
            if master_fd is not None:
                os.close(master_fd)
            raise Status(_INVALID, str(err)) from err
        finally:
            if slave_fd is not None:
                os.close(slave_fd)
        with _reaped_lock:
            _owned_pids.add(popen.pid)
        import uuid  # here, not at the top: uuid imports platform (guest boot time under TCG)

        process_id = uuid.uuid4().hex
        proc = ManagedProcess(
            process_id,
            popen,
            argv,
            master_fd=master_fd,
            keep_alive=start.keep_alive,
            timeout=start.timeout_seconds,
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


class ExecServicer(pb_grpc.ExecServicer):
    """``vsockrpc.agent.v1.Exec`` on top of a :class:`ProcessTable`."""

    def __init__(self, table: ProcessTable | None = None) -> None:
        self.table = table if table is not None else ProcessTable()

    def Exec(
        self, request_iterator: Iterator[pb.ExecRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ExecEvent]:
        with statuses(context, "Exec"):
            first = next(request_iterator, None)
            kind = first.WhichOneof("request") if first is not None else None
            if first is None or kind not in ("start", "attach"):
                raise Status(_INVALID, "the first Exec message must be `start` or `attach`")
            if kind == "start":
                proc = self.table.spawn(first.start)
            else:
                proc = self.table.get(first.attach.process_id)
            proc.attach()
        stop = threading.Event()
        context.add_callback(stop.set)
        feeder = threading.Thread(
            target=self._feed,
            args=(request_iterator, proc, stop),
            name=f"exec-feed-{proc.process_id[:8]}",
            daemon=True,
        )
        feeder.start()
        finished = False
        try:
            yield pb.ExecEvent(
                started=pb.ExecStarted(
                    process_id=proc.process_id, pid=proc.pid, attached=kind == "attach"
                )
            )
            while True:
                event = proc.next_event(stop)
                if event is None:
                    break
                if event.HasField("exited"):
                    finished = True  # counted as delivered once handed to gRPC
                yield event
                if finished:
                    break
        finally:
            stop.set()
            proc.detach(finished=finished)

    @staticmethod
    def _feed(
        requests: Iterator[pb.ExecRequest], proc: ManagedProcess, stop: threading.Event
    ) -> None:
        try:
            for request in requests:
                kind = request.WhichOneof("request")
                try:
                    if kind == "stdin":
                        proc.write_stdin(request.stdin)
                    elif kind == "close_stdin":
                        proc.close_stdin()
                    elif kind == "signal":
                        proc.signal(request.signal)
                    elif kind == "resize":
                        proc.resize(request.resize.rows, request.resize.cols)
                    else:
                        log.info("ignoring Exec message %r after the first", kind)
                except Status as err:
                    log.info("Exec %s: %s", kind, err.message)
                if stop.is_set():
                    return
        except Exception as err:  # the stream was cancelled or broke: the RPC ends anyway
            log.debug("exec input stream of %s ended: %r", proc.process_id, err)

    def Signal(self, request: pb.SignalRequest, context: grpc.ServicerContext) -> pb.SignalResponse:
        with statuses(context, "Signal"):
            self.table.get(request.process_id).signal(request.signal)
        return pb.SignalResponse()

    def ListProcesses(
        self, request: pb.ListProcessesRequest, context: grpc.ServicerContext
    ) -> pb.ListProcessesResponse:
        return pb.ListProcessesResponse(
            processes=[
                pb.ProcessInfo(
                    process_id=p.process_id,
                    pid=p.pid,
                    argv=p.argv,
                    attached=p.attached,
                    running=p.running,
                    pty=p.pty,
                )
                for p in self.table.list()
            ]
        )
