"""The Exec service: processes started, streamed, signalled and re-attached by id.

The servicer is the gRPC edge only: the stream protocol is :mod:`.exec_stream`, the process
manager (spawning, pumping output with back-pressure, reaping, timeouts) is :mod:`.spawn` and
:mod:`.process`, which know nothing of gRPC.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.services.agent._rpc import statuses
from vsockrpc.services.agent.exec_stream import open_process, relay_events, start_feeder
from vsockrpc.services.agent.spawn import ProcessTable

__all__ = ["ExecServicer"]


class ExecServicer(pb_grpc.ExecServicer):
    """``vsockrpc.agent.v1.Exec`` on top of a :class:`ProcessTable`."""

    def __init__(self, table: ProcessTable | None = None) -> None:
        self.table = table if table is not None else ProcessTable()

    def Exec(
        self, request_iterator: Iterator[pb.ExecRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ExecEvent]:
        with statuses(context, "Exec"):
            proc, attached = open_process(next(request_iterator, None), self.table)
        stop = threading.Event()
        context.add_callback(stop.set)
        start_feeder(request_iterator, proc, stop)
        yield from relay_events(proc, stop, attached=attached)

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
