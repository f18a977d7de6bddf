"""The Exec stream protocol: ``ExecRequest`` messages in, ``ExecEvent`` messages out, on top of
the process manager (:mod:`.spawn`, :mod:`.process`).

The first request is ``start`` (spawn a process) or ``attach`` (become the reader of a
``keep_alive`` one); the stream answers ``started``. A feeder thread applies the requests that
follow (``stdin``, ``close_stdin``, ``signal``, ``resize``) while the process's events go out
in order, ``exited`` last. When the stream ends before ``exited`` the process is detached:
killed, unless it was started with ``keep_alive``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.services.agent._status import Code, Status
from vsockrpc.services.agent.process import Exit, ManagedProcess, Output, ProcessEvent
from vsockrpc.services.agent.spawn import ProcessSpec, ProcessTable

__all__ = ["event_message", "open_process", "process_spec", "relay_events", "start_feeder"]

log = logging.getLogger("vsockrpc.agent.exec")


def process_spec(start: pb.ExecStart) -> ProcessSpec:
    return ProcessSpec(
        argv=list(start.argv),
        env=list(start.env),
        inherit_env=start.inherit_env,
        cwd=start.cwd,
        user=start.user,
        timeout=start.timeout_seconds,
        pty=start.pty,
        window=(start.window.rows, start.window.cols),
        term=start.term,
        keep_alive=start.keep_alive,
    )


def event_message(event: ProcessEvent) -> pb.ExecEvent:
    if isinstance(event, Output):
        if event.stream == "stdout":
            return pb.ExecEvent(stdout=event.data)
        return pb.ExecEvent(stderr=event.data)
    exited = pb.ExecExited(timed_out=event.timed_out)
    if event.returncode >= 0:
        exited.exit_code = event.returncode
    else:
        exited.signal = -event.returncode
    return pb.ExecEvent(exited=exited)


def open_process(first: pb.ExecRequest | None, table: ProcessTable) -> tuple[ManagedProcess, bool]:
    """The process the stream is about, attached to it; and whether it was an ``attach``."""
    kind = first.WhichOneof("request") if first is not None else None
    if first is None or kind not in ("start", "attach"):
        raise Status(Code.INVALID_ARGUMENT, "the first Exec message must be `start` or `attach`")
    if kind == "start":
        proc = table.spawn(process_spec(first.start))
    else:
        proc = table.get(first.attach.process_id)
    proc.attach()
    return proc, kind == "attach"


def _apply(request: pb.ExecRequest, proc: ManagedProcess) -> None:
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


def _feed(requests: Iterator[pb.ExecRequest], proc: ManagedProcess, stop: threading.Event) -> None:
    try:
        for request in requests:
            _apply(request, proc)
            if stop.is_set():
                return
    except Exception as err:  # the stream was cancelled or broke: the RPC ends anyway
        log.debug("exec input stream of %s ended: %r", proc.process_id, err)


def start_feeder(
    requests: Iterator[pb.ExecRequest], proc: ManagedProcess, stop: threading.Event
) -> threading.Thread:
    """Apply the requests after the first to ``proc`` on a thread, until they end or ``stop``."""
    feeder = threading.Thread(
        target=_feed,
        args=(requests, proc, stop),
        name=f"exec-feed-{proc.process_id[:8]}",
        daemon=True,
    )
    feeder.start()
    return feeder


def relay_events(
    proc: ManagedProcess, stop: threading.Event, *, attached: bool
) -> Iterator[pb.ExecEvent]:
    """``started``, then the process's events until ``exited`` (or ``stop``); then detaches."""
    finished = False
    try:
        yield pb.ExecEvent(
            started=pb.ExecStarted(process_id=proc.process_id, pid=proc.pid, attached=attached)
        )
        while True:
            event = proc.next_event(stop)
            if event is None:
                break
            finished = isinstance(event, Exit)  # counted as delivered once handed to gRPC
            yield event_message(event)
            if finished:
                break
    finally:
        stop.set()
        proc.detach(finished=finished)
