"""The client side of the Exec stream: :class:`Process`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import IO

import grpc

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import AgentError
from vsockrpc.sdk._common import CHUNK_SIZE, agent_error, check_signal, check_window
from vsockrpc.sdk._types import ExecEvent, ExecResult, Exited, Started, Stderr, Stdout

__all__ = ["Process", "StdinSource"]

StdinSource = bytes | Iterable[bytes] | IO[bytes]


def _event(event: pb.ExecEvent) -> ExecEvent:
    kind = event.WhichOneof("event")
    if kind == "stdout":
        return Stdout(event.stdout)
    if kind == "stderr":
        return Stderr(event.stderr)
    if kind == "exited":
        exited = event.exited
        which = exited.WhichOneof("status")
        return Exited(
            exit_code=exited.exit_code if which == "exit_code" else None,
            signal=exited.signal if which == "signal" else None,
            timed_out=exited.timed_out,
        )
    if kind == "started":
        started = event.started
        return Started(started.process_id, started.pid, started.attached)
    raise AgentError(f"unexpected Exec event {kind!r} from the agent", code="INTERNAL")


def _stdin_chunks(source: StdinSource) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        for offset in range(0, len(data), CHUNK_SIZE):
            yield data[offset : offset + CHUNK_SIZE]
    elif hasattr(source, "read"):
        while chunk := source.read(CHUNK_SIZE):
            yield chunk
    else:
        for chunk in source:
            if chunk:
                yield bytes(chunk)


class Process:
    """A process running in the guest, streamed over one ``Exec`` call.

    Iterate to get events as they happen: :class:`Started` first, then :class:`Stdout` /
    :class:`Stderr` chunks, and :class:`Exited` last. Feed it with :meth:`send` /
    :meth:`close_stdin`, steer it with :meth:`signal` and :meth:`resize`. Leaving the ``with``
    block (or :meth:`close`) before it exited ends the stream: the agent kills the process
    unless it was started with ``keep_alive=True`` (then :meth:`Guest.attach` resumes it).
    """

    def __init__(
        self,
        stub: pb_grpc.ExecStub,
        first: pb.ExecRequest,
        stdin: StdinSource | None = None,
    ) -> None:
        self._requests: queue.Queue[pb.ExecRequest] = queue.Queue(maxsize=16)
        self._closed = threading.Event()
        self._stdin = stdin
        self._stdin_error: Exception | None = None
        self._call_made = threading.Event()
        self._call = stub.Exec(self._request_iterator(first))
        self._call_made.set()
        self.exited: Exited | None = None
        first_event = self._next_raw()
        if not isinstance(first_event, Started):
            self.close()
            raise AgentError("the agent did not start the process", code="INTERNAL")
        self.started = first_event
        self.process_id = first_event.process_id
        self.pid = first_event.pid
        self._yielded_started = False

    def _request_iterator(self, first: pb.ExecRequest) -> Iterator[pb.ExecRequest]:
        # Runs on grpc's request thread: it blocks here when the agent stops reading (the
        # process does not consume stdin), which is the back-pressure we want.
        yield first
        if self._stdin is not None:
            try:
                for chunk in _stdin_chunks(self._stdin):
                    if self._closed.is_set():
                        return
                    yield pb.ExecRequest(stdin=chunk)
            except Exception as err:
                # grpc would log this with a traceback: end the call, report it from the stream.
                self._stdin_error = err
                self._closed.set()
                self._call_made.wait()
                self._call.cancel()
                return
            yield pb.ExecRequest(close_stdin=True)
        while not self._closed.is_set():
            try:
                yield self._requests.get(timeout=0.1)
            except queue.Empty:
                continue

    def _put(self, request: pb.ExecRequest) -> None:
        while not self._closed.is_set():
            try:
                self._requests.put(request, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next_raw(self) -> ExecEvent | None:
        try:
            event = _event(next(self._call))
        except StopIteration:
            return None
        except grpc.RpcError as err:
            self._closed.set()
            if self._stdin_error is not None:
                cause = self._stdin_error
                raise AgentError(f"exec: reading its stdin failed: {cause}") from cause
            raise agent_error(err, "exec") from err
        if isinstance(event, Exited):
            self.exited = event
            self._closed.set()
        return event

    def __iter__(self) -> Iterator[ExecEvent]:
        if not self._yielded_started:
            self._yielded_started = True
            yield self.started
        while self.exited is None:
            event = self._next_raw()
            if event is None:
                if self.exited is None:
                    raise AgentError("the exec stream ended before the process exited")
                return
            yield event

    def send(self, data: bytes) -> None:
        """Write ``data`` to the process's stdin (or its terminal in PTY mode)."""
        self._put(pb.ExecRequest(stdin=data))

    def close_stdin(self) -> None:
        """End of input: the process reads EOF (PTY mode: the terminal's EOF character)."""
        self._put(pb.ExecRequest(close_stdin=True))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process group (:class:`BadInputError` if it is not a signal
        number)."""
        self._put(pb.ExecRequest(signal=int(check_signal(signum))))

    def resize(self, rows: int, cols: int) -> None:
        """Change the PTY's window size (the process gets SIGWINCH); each side 1 to 65535."""
        rows, cols = check_window(rows, cols)
        self._put(pb.ExecRequest(resize=pb.WindowSize(rows=rows, cols=cols)))

    def wait(self) -> ExecResult:
        """Consume the remaining events; returns everything collected since this call."""
        out: list[bytes] = []
        err: list[bytes] = []
        for event in self:
            if isinstance(event, Stdout):
                out.append(event.data)
            elif isinstance(event, Stderr):
                err.append(event.data)
        assert self.exited is not None
        return ExecResult(
            argv=[],
            pid=self.pid,
            exit_code=self.exited.exit_code,
            signal=self.exited.signal,
            stdout=b"".join(out),
            stderr=b"".join(err),
            timed_out=self.exited.timed_out,
        )

    def close(self) -> None:
        """End the stream (the agent kills the process unless it has ``keep_alive``)."""
        self._closed.set()
        if self.exited is None:
            self._call.cancel()

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
