"""One process the agent started: its fds, pump thread and bounded event queue (no gRPC).

* A *pump* thread polls the process's output fds (two pipes, or the PTY master) plus a pidfd,
  reads chunks of at most :data:`CHUNK_SIZE` and puts events into a bounded queue
  (:data:`QUEUE_DEPTH` events). When the queue is full the pump blocks, stops reading, the pipe
  fills and the process blocks in ``write``: output is flow-controlled end to end (the reader of
  :meth:`ManagedProcess.next_event` → our queue → the pipe), and the agent's memory stays
  bounded whatever the process writes.
* Nothing is lost at exit: after the pidfd reports the exit, the pump keeps reading until the
  pipes are drained (a pipe write is complete before ``exit``), then reaps the process and queues
  the :class:`Exit` event last.
* When the reader goes away before :class:`Exit` (:meth:`ManagedProcess.detach`): with
  ``keep_alive`` the process keeps running (its output waits in the queue, back-pressure pausing
  it) for a later attach; otherwise its process group is killed.

Reaping: the pump reaps its own child with ``waitid(P_PID)``. A PID-1 init that reaps with
``waitpid(-1)`` in the same process must hand every status it collects to
:func:`record_reaped`, so an agent child reaped there still reports its real exit status.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from vsockrpc.agent import WINDOW_MAX
from vsockrpc.services.agent._status import Code, Status

__all__ = [
    "CHUNK_SIZE",
    "QUEUE_DEPTH",
    "Exit",
    "ManagedProcess",
    "Output",
    "ProcessEvent",
    "is_agent_child",
    "record_reaped",
]

log = logging.getLogger("vsockrpc.agent.exec")

CHUNK_SIZE = 64 * 1024
"""Largest output chunk per event (one read)."""
QUEUE_DEPTH = 16
"""Events buffered per process: at most QUEUE_DEPTH * CHUNK_SIZE bytes of output held."""
PTY_DRAIN_GRACE = 0.2
"""Seconds of silence after exit before a PTY still held open by a descendant is given up."""
STDIN_WAIT = 0.1
"""Seconds a stdin write waits for room before it looks again whether stdin was closed."""
MAX_POLL_MS = 60_000
"""Longest single wait for output (poll(2) takes a C int of ms: a deadline months away used to
overflow it and kill the output pump); the loop checks the deadline after each wait."""


@dataclass(frozen=True, slots=True)
class Output:
    """A chunk the process wrote (PTY output counts as stdout)."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True, slots=True)
class Exit:
    """The process was reaped: ``returncode`` as in subprocess (negative = killed by signal)."""

    returncode: int
    timed_out: bool


ProcessEvent = Output | Exit

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


def claim_child(pid: int) -> None:
    """Mark ``pid`` as the agent's own child (right after it was started)."""
    with _reaped_lock:
        _owned_pids.add(pid)


def set_window(fd: int, rows: int, cols: int) -> None:
    """Set a terminal's window size (0 means the 24x80 default)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows or 24, cols or 80, 0, 0))


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
        self._events: queue.Queue[ProcessEvent] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._lock = threading.Lock()
        self._stdin_lock = threading.Lock()  # the stdin fd's state; held only briefly
        self._stdin_writer = threading.Lock()  # one write_stdin at a time, in order
        self._stdin_closed = False
        # Input is written without blocking (write_stdin waits for room outside the lock):
        # a blocked write(2) held the lock that the pump's clean-up needs, so a descendant
        # keeping stdin open without reading it pinned two threads and the fds until it exited.
        os.set_blocking(master_fd if master_fd is not None else self._stdin_fd(), False)
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
        """Become the process's one reader (FAILED_PRECONDITION when it already has one)."""
        with self._lock:
            if self._attached:
                raise Status(
                    Code.FAILED_PRECONDITION,
                    f"process {self.process_id} already has a stream attached",
                )
            if self._abandoned.is_set() or self._delivered_exit:
                raise Status(Code.NOT_FOUND, f"no process {self.process_id}")
            self._attached = True

    def detach(self, *, finished: bool) -> None:
        """The reader went away; ``finished`` when it took the :class:`Exit` event."""
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

    def next_event(self, stop: threading.Event) -> ProcessEvent | None:
        """The next event, or None once ``stop`` is set (the reader went away)."""
        while True:
            try:
                return self._events.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return None

    # ------------------------------------------------------------------ input

    def write_stdin(self, data: bytes) -> None:
        """Write ``data``, waiting while the pipe or terminal is full (back-pressure to the
        client when the process doesn't read). What is left is dropped once stdin is closed:
        after ``close_stdin``, or when the process has finished (its output pump's clean-up),
        even if a descendant still holds the pipe."""
        view = memoryview(data)
        with self._stdin_writer:
            while view:
                with self._stdin_lock:
                    if self._stdin_closed:
                        return
                    fd = self._master_fd if self._master_fd is not None else self._stdin_fd()
                    try:
                        view = view[os.write(fd, view) :]
                        continue
                    except BlockingIOError:
                        pass
                    except OSError as err:  # EPIPE: no reader left; EIO: the PTY is gone
                        log.debug("stdin of %s: %s", self.process_id, err)
                        return
                # Full: wait for room without the lock. Once stdin is closed the fd number may
                # be closed (POLLNVAL, at once) or reused: either way the next look sees
                # _stdin_closed before writing anything.
                room = select.poll()
                room.register(fd, select.POLLOUT)
                room.poll(int(STDIN_WAIT * 1000))

    def _stdin_fd(self) -> int:
        assert self.popen.stdin is not None
        return self.popen.stdin.fileno()

    def close_stdin(self) -> None:
        if self.pty:
            # A PTY has no half-close: send the line discipline's EOF character (VEOF).
            with self._stdin_lock:
                if self._stdin_closed or self._master_fd is None:
                    return
                try:
                    eof = termios.tcgetattr(self._master_fd)[6][termios.VEOF]
                except OSError:
                    return
            self.write_stdin(eof if isinstance(eof, bytes) else b"\x04")
            return
        with self._stdin_lock:
            if self._stdin_closed:
                return
            self._stdin_closed = True
            if self.popen.stdin is not None:
                with contextlib.suppress(OSError):
                    self.popen.stdin.close()

    def signal(self, signum: int) -> None:
        if not 1 <= signum < signal.NSIG:
            raise Status(Code.INVALID_ARGUMENT, f"invalid signal number {signum}")
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
            raise Status(Code.FAILED_PRECONDITION, "resize needs a PTY (pty=true)")
        if not (0 < rows <= WINDOW_MAX and 0 < cols <= WINDOW_MAX):
            raise Status(Code.INVALID_ARGUMENT, f"invalid window size {rows}x{cols}")
        with contextlib.suppress(OSError):
            set_window(self._master_fd, rows, cols)  # the kernel sends SIGWINCH

    # ------------------------------------------------------------------ pump

    def _emit(self, event: ProcessEvent) -> None:
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

    def _output_fds(self) -> dict[int, Literal["stdout", "stderr"]]:
        if self._master_fd is not None:
            return {self._master_fd: "stdout"}
        assert self.popen.stdout is not None and self.popen.stderr is not None
        return {self.popen.stdout.fileno(): "stdout", self.popen.stderr.fileno(): "stderr"}

    def _pump(self) -> None:
        try:
            self._pump_output()
            returncode = self._reap()
            log.info("process %s (pid %d) exited: %s", self.process_id, self.pid, returncode)
            self._emit(Exit(returncode, self._timed_out))
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
                    left_ms = int((self._deadline - time.monotonic()) * 1000) + 1
                    timeout_ms = min(max(0, left_ms), MAX_POLL_MS)
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
                except BlockingIOError:  # a PTY master is non-blocking (see write_stdin)
                    continue
                except OSError:  # EIO on a PTY master once every slave fd is closed
                    data = b""
                if not data:
                    poller.unregister(fd)
                    del fds[fd]
                    continue
                self._emit(Output(fds[fd], data))
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
