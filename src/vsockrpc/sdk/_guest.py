"""The synchronous Python SDK: :class:`Guest` (one agent connection) and :class:`Process`."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import IO, Any, Literal

import grpc

from vsockrpc.addresses import Address, HybridAddress, UnixAddress, VsockAddress, parse_address
from vsockrpc.errors import AgentError
from vsockrpc.proto.agent.v1 import agent_pb2 as pb
from vsockrpc.proto.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.sdk._types import (
    ExecEvent,
    ExecResult,
    Exited,
    FileInfo,
    FileType,
    GuestInfo,
    ProcessSummary,
    Started,
    Stderr,
    Stdout,
    TransferStats,
)
from vsockrpc.services.agent.checksum import Hasher, new_hasher

__all__ = ["CHUNK_SIZE", "Guest", "Process"]

CHUNK_SIZE = 1024 * 1024
"""Bytes per upload chunk (well under gRPC's 4 MiB message limit)."""
DATA_CHANNEL_MIN = 1024 * 1024
"""Transfers at least this big go over a raw data channel when the agent offers one."""

StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]
StdinSource = bytes | Iterable[bytes] | IO[bytes]
Checksum = Literal["sha256", "crc32"]
_CHECKSUMS = {"sha256": pb.CHECKSUM_SHA256, "crc32": pb.CHECKSUM_CRC32}


def _b(value: Arg) -> bytes:
    return os.fsencode(value)


def agent_error(err: grpc.RpcError, what: str) -> AgentError:
    """An :class:`AgentError` for a failed call, carrying the status code name."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    name = code.name if code is not None else "UNKNOWN"
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    hint = None
    if name == "UNAVAILABLE":
        hint = "is the guest running and its agent listening on that address?"
    elif name == "PERMISSION_DENIED":
        hint = "the agent admits only allowed peers (VSOCKRPC_AGENT_ALLOWED_CIDS in the guest)"
    return AgentError(f"{what}: {name}: {details}", code=name, hint=hint)


def _file_info(info: pb.FileInfo) -> FileInfo:
    return FileInfo(
        path=info.path,
        type=FileType(info.type) if info.type in (0, 1, 2, 3, 4) else FileType.OTHER,
        size=info.size,
        mode=info.mode,
        mtime_ns=info.mtime_ns,
        uid=info.uid,
        gid=info.gid,
        symlink_target=info.symlink_target,
    )


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


def _receive_raw(sock: socket.socket, sink: IO[bytes], digest: Hasher) -> int:
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    received = 0
    while n := sock.recv_into(view):
        digest.update(view[:n])
        sink.write(view[:n])
        received += n
    return received


def _send_raw(sock: socket.socket, source: IO[bytes], digest: Hasher, chunk_size: int) -> int:
    """Copy ``source`` to the data channel; one reused buffer when it has ``readinto``."""
    sent = 0
    readinto = getattr(source, "readinto", None)
    if readinto is None:
        while chunk := source.read(chunk_size):
            digest.update(chunk)
            sock.sendall(chunk)
            sent += len(chunk)
        return sent
    view = memoryview(bytearray(chunk_size))
    while n := readinto(view):
        digest.update(view[:n])
        sock.sendall(view[:n])
        sent += n
    return sent


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
        self._call = stub.Exec(self._request_iterator(first))
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
            for chunk in _stdin_chunks(self._stdin):
                if self._closed.is_set():
                    return
                yield pb.ExecRequest(stdin=chunk)
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
        """Send ``signum`` to the process group."""
        self._put(pb.ExecRequest(signal=int(signum)))

    def resize(self, rows: int, cols: int) -> None:
        """Change the PTY's window size (the process gets SIGWINCH)."""
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


class Guest:
    """A connection to a guest agent.

    ``target`` is an address (``hvsock:/run/vm.vsock:9999``, ``vsock:3:9999``, ``unix:/p``…)
    or an open ``grpc.Channel`` (then the caller keeps ownership). ``wait`` > 0 blocks until
    the agent answers (boot race) for at most that many seconds. ``call_timeout`` bounds each
    unary call. ``checksum`` checks every transfer end to end: "crc32" (default) or "sha256".
    Its job is to catch transfer errors (a bug in a relay or device, a cut stream), not an
    adversary — whoever can reach the agent is root in the guest anyway — and CRC-32 catches
    every burst error up to 32 bits and random corruption but for 1 in 2**32, at ~7x the speed
    of SHA-256 in an emulated guest (where SHA-256, 10-28 MiB/s, would bound every transfer).
    Choose "sha256" for a cryptographic digest of what arrived.
    ``data_channel``: large transfers use a raw socket beside the gRPC call when the agent
    offers one (needs an address, not a channel); otherwise the bytes go in-band.
    Every failure raises :class:`vsockrpc.errors.AgentError` with ``code`` set to
    the gRPC status name (``NOT_FOUND``, ``PERMISSION_DENIED``…)::

        with Guest("hvsock:/run/vm.vsock:9999") as g:
            print(g.run(["uname", "-a"]).stdout.decode())
            g.put("build/", "/opt/build")
            for event in g.exec_stream(["make", "-C", "/opt/build"]):
                ...
    """

    def __init__(
        self,
        target: Address | str | grpc.Channel,
        *,
        wait: float = 0.0,
        call_timeout: float = 60.0,
        checksum: Checksum = "crc32",
        data_channel: bool = True,
    ) -> None:
        if checksum not in _CHECKSUMS:
            raise ValueError(f"checksum must be one of {sorted(_CHECKSUMS)}, not {checksum!r}")
        self._checksum = _CHECKSUMS[checksum]
        self._owned: Any = None
        self._address: Address | None = None
        self._data_channel = data_channel
        if isinstance(target, grpc.Channel):
            channel = target
        else:
            self._address = parse_address(target)
            from vsockrpc import rpc

            self._owned = rpc.channel(target)
            channel = self._owned
            if wait > 0:
                try:
                    rpc.channel_ready(channel, timeout=wait, what=str(target))
                except BaseException:
                    self._owned.close()
                    raise
        self._timeout = call_timeout
        self._exec = pb_grpc.ExecStub(channel)  # type: ignore[no-untyped-call]
        self._files = pb_grpc.FilesStub(channel)  # type: ignore[no-untyped-call]
        self._system = pb_grpc.SystemStub(channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, what: str) -> Any:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as err:
            raise agent_error(err, what) from err

    # ------------------------------------------------------------------ exec

    def exec_stream(
        self,
        argv: Sequence[Arg],
        *,
        stdin: StdinSource | None = None,
        env: dict[str, str] | None = None,
        inherit_env: bool = False,
        cwd: StrPath | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        pty: bool = False,
        window: tuple[int, int] | None = None,
        term: str | None = None,
        keep_alive: bool = False,
    ) -> Process:
        """Start ``argv`` in the guest and return the streaming :class:`Process`.

        ``stdin`` (bytes, an iterable of bytes or a binary file) is streamed and then closed;
        without it, use :meth:`Process.send`. ``timeout`` kills the process group after that
        many seconds; ``pty`` runs it on a terminal of ``window`` = (rows, cols).
        """
        start = pb.ExecStart(
            argv=[_b(a) for a in argv],
            env=[_b(k) + b"=" + _b(v) for k, v in (env or {}).items()],
            inherit_env=inherit_env,
            cwd=_b(cwd) if cwd is not None else b"",
            user=str(user) if user is not None else "",
            timeout_seconds=timeout or 0.0,
            pty=pty,
            keep_alive=keep_alive,
            term=term or "",
        )
        if window is not None:
            start.window.rows, start.window.cols = window
        return Process(self._exec, pb.ExecRequest(start=start), stdin)

    def attach(self, process_id: str) -> Process:
        """Resume streaming a ``keep_alive`` process whose earlier stream ended."""
        return Process(
            self._exec, pb.ExecRequest(attach=pb.ExecAttach(process_id=process_id)), None
        )

    def run(
        self,
        argv: Sequence[Arg],
        *,
        input: bytes | None = None,
        check: bool = False,
        env: dict[str, str] | None = None,
        inherit_env: bool = False,
        cwd: StrPath | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` to completion and collect its output (like ``subprocess.run``).

        stdin gets ``input`` then EOF (EOF at once without it). ``check=True`` raises
        :class:`AgentError` when the process did not exit with 0.
        """
        with self.exec_stream(
            argv,
            stdin=input if input is not None else b"",
            env=env,
            inherit_env=inherit_env,
            cwd=cwd,
            user=user,
            timeout=timeout,
        ) as proc:
            partial = proc.wait()
        result = ExecResult(
            argv=[_b(a) for a in argv],
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
        self._unary(
            self._exec.Signal, pb.SignalRequest(process_id=process_id, signal=signum), "signal"
        )

    def processes(self) -> list[ProcessSummary]:
        reply = self._unary(self._exec.ListProcesses, pb.ListProcessesRequest(), "processes")
        return [
            ProcessSummary(p.process_id, p.pid, list(p.argv), p.attached, p.running, p.pty)
            for p in reply.processes
        ]

    # ------------------------------------------------------------------ files

    def stat(self, path: StrPath, *, follow_symlinks: bool = False) -> FileInfo:
        request = pb.StatRequest(path=_b(path), follow_symlinks=follow_symlinks)
        return _file_info(self._unary(self._files.Stat, request, f"stat {os.fsdecode(path)}"))

    def exists(self, path: StrPath) -> bool:
        try:
            self.stat(path)
        except AgentError as err:
            if err.code == "NOT_FOUND":
                return False
            raise
        return True

    def listdir(self, path: StrPath, *, recursive: bool = False) -> list[FileInfo]:
        """Entries of a guest directory (paths relative to it), parents before children."""
        try:
            return [
                _file_info(info)
                for info in self._files.List(pb.ListRequest(path=_b(path), recursive=recursive))
            ]
        except grpc.RpcError as err:
            raise agent_error(err, f"list {os.fsdecode(path)}") from err

    def makedirs(self, path: StrPath, *, mode: int = 0o755) -> FileInfo:
        request = pb.MakeDirsRequest(path=_b(path), mode=mode)
        return _file_info(self._unary(self._files.MakeDirs, request, "mkdir"))

    def remove(self, path: StrPath, *, recursive: bool = False, missing_ok: bool = False) -> bool:
        request = pb.RemoveRequest(path=_b(path), recursive=recursive, missing_ok=missing_ok)
        return bool(self._unary(self._files.Remove, request, f"remove {os.fsdecode(path)}").removed)

    def rename(
        self, source: StrPath, destination: StrPath, *, no_overwrite: bool = False
    ) -> FileInfo:
        request = pb.RenameRequest(
            source=_b(source), destination=_b(destination), no_overwrite=no_overwrite
        )
        return _file_info(self._unary(self._files.Rename, request, "rename"))

    def _open_data_channel(self) -> tuple[socket.socket, str] | None:
        """A connected raw data socket and its ticket, or None to send in-band."""
        if not self._data_channel or self._address is None:
            return None
        try:
            reply = self._files.OpenDataChannel(pb.OpenDataChannelRequest(), timeout=self._timeout)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION):
                self._data_channel = False  # this agent can't: stop asking
                return None
            raise agent_error(err, "open data channel") from err
        target: Address | None = None
        if isinstance(self._address, HybridAddress) and reply.vsock_port:
            target = HybridAddress(self._address.path, reply.vsock_port)
        elif isinstance(self._address, VsockAddress) and reply.vsock_port:
            target = VsockAddress(self._address.cid, reply.vsock_port)
        elif isinstance(self._address, UnixAddress) and reply.unix_path:
            target = UnixAddress(reply.unix_path)
        if target is None:
            self._data_channel = False
            return None
        from vsockrpc import transport

        sock = transport.connect(target, timeout=30)
        try:
            sock.sendall(reply.ticket.encode("ascii") + b"\n")
        except OSError as err:
            sock.close()
            raise AgentError(f"data channel to {target}: {err}") from err
        return sock, reply.ticket

    def upload(
        self,
        source: IO[bytes],
        remote: StrPath,
        *,
        size: int,
        mode: int = 0o644,
        mtime_ns: int = 0,
        make_parents: bool = True,
        no_overwrite: bool = False,
        chunk_size: int = CHUNK_SIZE,
    ) -> FileInfo:
        """Stream ``size`` bytes from ``source`` to the guest file ``remote``, checksummed.

        The guest writes a temporary file and renames it into place only when the size and
        checksum (CRC-32 or SHA-256, see :class:`Guest`) match: on any failure ``remote`` is
        left as it was.
        """
        header = pb.UploadHeader(
            path=_b(remote),
            mode=mode,
            mtime_ns=mtime_ns,
            size=size,
            make_parents=make_parents,
            no_overwrite=no_overwrite,
            checksum=self._checksum,
        )

        data = self._open_data_channel() if size >= DATA_CHANNEL_MIN else None
        if data is not None:
            header.ticket = data[1]

        def parts() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(header=header)
            digest = new_hasher(self._checksum)
            sent = 0
            if data is not None:
                sent = _send_raw(data[0], source, digest, chunk_size)
                data[0].close()
            while data is None and (chunk := source.read(chunk_size)):
                digest.update(chunk)
                sent += len(chunk)
                yield pb.UploadRequest(data=chunk)
            yield pb.UploadRequest(trailer=pb.TransferTrailer(digest=digest.digest(), size=sent))

        try:
            return _file_info(self._files.Upload(parts()))
        except grpc.RpcError as err:
            raise agent_error(err, f"upload to {os.fsdecode(remote)}") from err
        finally:
            if data is not None:
                data[0].close()

    def download(
        self, remote: StrPath, sink: IO[bytes], *, size_hint: int | None = None
    ) -> FileInfo:
        """Stream the guest file ``remote`` into ``sink``; raises DATA_LOSS on a bad checksum.

        Returns the file's metadata as the agent saw it when the download began. A raw data
        channel is used unless ``size_hint`` says the file is small.
        """
        digest = new_hasher(self._checksum)
        received = 0
        header: FileInfo | None = None
        what = f"download of {os.fsdecode(remote)}"
        use_data = size_hint is None or size_hint >= DATA_CHANNEL_MIN
        data = self._open_data_channel() if use_data else None
        try:
            request = pb.DownloadRequest(
                path=_b(remote),
                chunk_size=CHUNK_SIZE,
                checksum=self._checksum,
                ticket=data[1] if data is not None else "",
            )
            for part in self._files.Download(request):
                kind = part.WhichOneof("part")
                if kind == "header":
                    header = _file_info(part.header)
                    if data is not None:
                        received = _receive_raw(data[0], sink, digest)
                elif kind == "data":
                    digest.update(part.data)
                    received += len(part.data)
                    sink.write(part.data)
                elif kind == "trailer":
                    if part.trailer.size != received or part.trailer.digest != digest.digest():
                        raise AgentError(
                            f"{what}: checksum or size mismatch "
                            f"({received} bytes received, {part.trailer.size} sent)",
                            code="DATA_LOSS",
                        )
                    assert header is not None
                    return header
        except grpc.RpcError as err:
            raise agent_error(err, what) from err
        finally:
            if data is not None:
                data[0].close()
        raise AgentError(f"{what}: stream ended without a trailer", code="DATA_LOSS")

    def put(
        self,
        local: StrPath,
        remote: StrPath,
        *,
        preserve: bool = True,
        make_parents: bool = True,
    ) -> TransferStats:
        """Copy the host file or directory tree ``local`` to the guest path ``remote``.

        A directory is copied recursively (``remote`` becomes that directory); symlinks to
        files are followed, symlinks to directories skipped. ``preserve`` keeps mode and mtime.
        """
        local_b = _b(local)
        remote_b = _b(remote)
        if not os.path.isdir(local_b):
            self._put_file(local_b, remote_b, preserve=preserve, make_parents=make_parents)
            return TransferStats(files=1, bytes=os.stat(local_b).st_size)
        files = size = dirs = 0
        for directory, subdirs, names in os.walk(local_b):
            rel = os.path.relpath(directory, local_b)
            target = remote_b if rel == b"." else os.path.join(remote_b, rel)
            mode = stat.S_IMODE(os.stat(directory).st_mode) if preserve else 0o755
            self.makedirs(target, mode=mode)
            dirs += 1
            subdirs[:] = [d for d in subdirs if not os.path.islink(os.path.join(directory, d))]
            for name in sorted(names):
                path = os.path.join(directory, name)
                if not os.path.isfile(path):
                    continue  # sockets, fifos, dangling links
                self._put_file(path, os.path.join(target, name), preserve=preserve)
                files += 1
                size += os.stat(path).st_size
        return TransferStats(files=files, bytes=size, directories=dirs)

    def _put_file(
        self, local: bytes, remote: bytes, *, preserve: bool, make_parents: bool = True
    ) -> None:
        with open(local, "rb") as f:
            st = os.fstat(f.fileno())
            self.upload(
                f,
                remote,
                size=st.st_size,
                mode=stat.S_IMODE(st.st_mode) if preserve else 0o644,
                mtime_ns=st.st_mtime_ns if preserve else 0,
                make_parents=make_parents,
            )

    def get(self, remote: StrPath, local: StrPath, *, preserve: bool = True) -> TransferStats:
        """Copy the guest file or directory tree ``remote`` to the host path ``local``.

        Each file is written to a temporary file beside its target and renamed into place
        after the checksum matched: a failed transfer leaves no partial file behind.
        """
        remote_b = _b(remote)
        local_b = _b(local)
        info = self.stat(remote_b, follow_symlinks=True)
        if not info.is_dir:
            self._get_file(remote_b, local_b, preserve=preserve, size_hint=info.size)
            return TransferStats(files=1, bytes=info.size)
        os.makedirs(local_b, exist_ok=True)
        files = size = 0
        dirs = 1
        for entry in self.listdir(remote_b, recursive=True):
            target = os.path.join(local_b, entry.path)
            source = os.path.join(remote_b, entry.path)
            if entry.type is FileType.DIRECTORY:
                os.makedirs(target, exist_ok=True)
                if preserve:
                    os.chmod(target, entry.mode)
                dirs += 1
            elif entry.type is FileType.REGULAR:
                self._get_file(source, target, preserve=preserve, size_hint=entry.size)
                files += 1
                size += entry.size
        if preserve:
            os.chmod(local_b, info.mode)
        return TransferStats(files=files, bytes=size, directories=dirs)

    def _get_file(
        self, remote: bytes, local: bytes, *, preserve: bool, size_hint: int | None = None
    ) -> None:
        directory = os.path.dirname(os.path.abspath(local))
        name = os.path.basename(local)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=b"." + name[:64] + b".", suffix=b".part")
        try:
            with os.fdopen(fd, "wb") as sink:
                info = self.download(remote, sink, size_hint=size_hint)
                sink.flush()
                os.fsync(sink.fileno())
            if preserve:
                os.chmod(tmp, info.mode)
                os.utime(tmp, ns=(info.mtime_ns, info.mtime_ns))
            os.replace(tmp, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read_bytes(self, remote: StrPath) -> bytes:
        """The whole content of a (small) guest file."""
        import io

        sink = io.BytesIO()
        self.download(remote, sink, size_hint=0)
        return sink.getvalue()

    def write_bytes(self, remote: StrPath, data: bytes, *, mode: int = 0o644) -> FileInfo:
        """Replace the guest file ``remote`` with ``data`` (atomically, checksummed)."""
        import io

        return self.upload(io.BytesIO(data), remote, size=len(data), mode=mode)

    # ------------------------------------------------------------------ system

    def ping(self, payload: bytes = b"") -> float:
        """Round-trip time of one Ping, in seconds."""
        start = time.perf_counter()
        reply = self._unary(self._system.Ping, pb.PingRequest(payload=payload), "ping")
        elapsed = time.perf_counter() - start
        if reply.payload != payload:
            raise AgentError("ping: the agent echoed a different payload", code="DATA_LOSS")
        return elapsed

    def info(self) -> GuestInfo:
        r = self._unary(self._system.Info, pb.InfoRequest(), "info")
        return GuestInfo(
            agent_version=r.agent_version,
            kernel_release=r.kernel_release,
            kernel_version=r.kernel_version,
            machine=r.machine,
            hostname=r.hostname,
            os_pretty_name=r.os_pretty_name,
            cpus=r.cpus,
            memory_total_bytes=r.memory_total_bytes,
            memory_available_bytes=r.memory_available_bytes,
            uptime_seconds=r.uptime_seconds,
            time_ns=r.time_ns,
            agent_pid=r.agent_pid,
            python_version=r.python_version,
            os_release=dict(r.os_release),
        )

    def sync_time(self) -> float:
        """Set the guest clock to the host's; returns how far off it was (guest - host, s)."""
        now = time.time_ns()
        reply = self._unary(self._system.SetTime, pb.SetTimeRequest(time_ns=now), "set time")
        return float((reply.previous_time_ns - now) / 1e9)

    def shutdown(self, *, reboot: bool = False) -> None:
        """Ask the guest to power off (or reboot); returns once the agent acknowledged."""
        action = pb.POWER_ACTION_REBOOT if reboot else pb.POWER_ACTION_POWEROFF
        self._unary(self._system.Shutdown, pb.ShutdownRequest(action=action), "shutdown")
