"""The Exec sub-client: start, run, attach to, signal and list guest processes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import AgentError, BadInputError
from vsockrpc.sdk._common import Arg, StrPath, check_signal, fsencode, unary
from vsockrpc.sdk._process import Process, StdinSource
from vsockrpc.sdk._types import ExecResult, ProcessSummary

__all__ = ["ExecClient"]


class ExecClient:
    """Calls of ``vsockrpc.agent.v1.Exec`` (documented on :class:`~vsockrpc.sdk.Guest`)."""

    def __init__(self, channel: grpc.Channel, call_timeout: float) -> None:
        self._stub = pb_grpc.ExecStub(channel)  # type: ignore[no-untyped-call]
        self._timeout = call_timeout

    def exec_stream(
        self,
        argv: Sequence[Arg],
        *,
        stdin: StdinSource | None,
        env: dict[str, str] | None,
        inherit_env: bool,
        cwd: StrPath | None,
        user: str | int | None,
        timeout: float | None,
        pty: bool,
        window: tuple[int, int] | None,
        term: str | None,
        keep_alive: bool,
    ) -> Process:
        if isinstance(argv, (str, bytes)):  # "ls -l" would run ['l', 's', ' ', ...]
            raise BadInputError(f"argv must be a list of arguments, not the string {argv!r}")
        for name in env or {}:
            if not name or "=" in name:  # {"A=B": "c"} would set A to "B=c"
                raise BadInputError(f"environment variable name {name!r} is empty or has '='")
        start = pb.ExecStart(
            argv=[fsencode(a) for a in argv],
            env=[fsencode(k) + b"=" + fsencode(v) for k, v in (env or {}).items()],
            inherit_env=inherit_env,
            cwd=fsencode(cwd) if cwd is not None else b"",
            user=str(user) if user is not None else "",
            timeout_seconds=timeout or 0.0,
            pty=pty,
            keep_alive=keep_alive,
            term=term or "",
        )
        if window is not None:
            start.window.rows, start.window.cols = window
        return Process(self._stub, pb.ExecRequest(start=start), stdin)

    def attach(self, process_id: str) -> Process:
        return Process(
            self._stub, pb.ExecRequest(attach=pb.ExecAttach(process_id=process_id)), None
        )

    def run(
        self,
        argv: Sequence[Arg],
        *,
        input: bytes | None,
        check: bool,
        env: dict[str, str] | None,
        inherit_env: bool,
        cwd: StrPath | None,
        user: str | int | None,
        timeout: float | None,
    ) -> ExecResult:
        with self.exec_stream(
            argv,
            stdin=input if input is not None else b"",
            env=env,
            inherit_env=inherit_env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            pty=False,
            window=None,
            term=None,
            keep_alive=False,
        ) as proc:
            partial = proc.wait()
        result = ExecResult(
            argv=[fsencode(a) for a in argv],
            pid=partial.pid,
            exit_code=partial.exit_code,
            signal=partial.signal,
            stdout=partial.stdout,
            stderr=partial.stderr,
            timed_out=partial.timed_out,
        )
        if check and not result.ok:
            how = (
                f"exit status {result.exit_code}"
                if result.exit_code is not None
                else f"signal {result.signal}"
            )
            raise AgentError(f"{os.fsdecode(result.argv[0])!r} failed with {how}")
        return result

    def signal(self, process_id: str, signum: int) -> None:
        request = pb.SignalRequest(process_id=process_id, signal=int(check_signal(signum)))
        unary(self._stub.Signal, request, "signal", self._timeout)

    def processes(self) -> list[ProcessSummary]:
        reply = unary(
            self._stub.ListProcesses, pb.ListProcessesRequest(), "processes", self._timeout
        )
        return [
            ProcessSummary(p.process_id, p.pid, list(p.argv), p.attached, p.running, p.pty)
            for p in reply.processes
        ]
