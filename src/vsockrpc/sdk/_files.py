"""The Files sub-client: path operations and checksummed transfers of files and trees.

A transfer of at least :data:`DATA_CHANNEL_MIN` bytes moves its bytes over a raw data channel
when the agent offers one (see :mod:`vsockrpc.agent.datachannel`); the header and the trailer
(size, checksum) stay on the gRPC stream either way.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from typing import IO

import grpc

from vsockrpc import transport
from vsockrpc.addresses import Address
from vsockrpc.agent.checksum import Hasher, new_hasher
from vsockrpc.agent.datachannel import pipelined_copy, ticket_line
from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import AgentError
from vsockrpc.sdk._common import CHUNK_SIZE, StrPath, agent_error, fsencode, unary
from vsockrpc.sdk._types import FileInfo, FileType, TransferStats

__all__ = ["DATA_CHANNEL_MIN", "FilesClient"]

DATA_CHANNEL_MIN = 1024 * 1024
"""Transfers at least this big go over a raw data channel when the agent offers one."""


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


def _receive_raw(sock: socket.socket, sink: IO[bytes], digest: Hasher) -> int:
    """Copy the data channel into ``sink``: the socket is read on this thread while another
    checksums and writes."""

    def drain(view: memoryview) -> None:
        digest.update(view)
        sink.write(view)

    return pipelined_copy(sock.recv_into, drain, fill_in_thread=False)


def _send_raw(sock: socket.socket, source: IO[bytes], digest: Hasher) -> int:
    """Copy ``source`` to the data channel: another thread reads and checksums it (into reused
    buffers, with ``readinto`` when it has one) while this one sends. (An upload's
    ``chunk_size`` sizes its gRPC messages, not these buffers.)"""
    readinto = getattr(source, "readinto", None)

    def fill(view: memoryview) -> int:
        if readinto is not None:
            n: int = readinto(view) or 0
        else:
            # None (a non-blocking source with nothing to give) ends it, as it ends readinto's.
            chunk = source.read(len(view)) or b""
            n = len(chunk)
            if n > len(view):
                raise ValueError(f"the source's read({len(view)}) returned {n} bytes")
            view[:n] = chunk
        digest.update(view[:n])
        return n

    return pipelined_copy(fill, sock.sendall, fill_in_thread=True)


class FilesClient:
    """Calls of ``vsockrpc.agent.v1.Files`` (documented on :class:`~vsockrpc.sdk.Guest`).

    ``address`` (None for a caller's channel) is where data channels are dialled.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        call_timeout: float,
        *,
        checksum: pb.Checksum.ValueType,
        address: Address | None,
        data_channel: bool,
    ) -> None:
        self._files = pb_grpc.FilesStub(channel)  # type: ignore[no-untyped-call]
        self._timeout = call_timeout
        self._checksum = checksum
        self._address = address
        self._data_channel = data_channel

    # ------------------------------------------------------------------ paths

    def stat(self, path: StrPath, *, follow_symlinks: bool = False) -> FileInfo:
        request = pb.StatRequest(path=fsencode(path), follow_symlinks=follow_symlinks)
        what = f"stat {os.fsdecode(path)}"
        return _file_info(unary(self._files.Stat, request, what, self._timeout))

    def exists(self, path: StrPath) -> bool:
        try:
            self.stat(path)
        except AgentError as err:
            if err.code == "NOT_FOUND":
                return False
            raise
        return True

    def listdir(self, path: StrPath, *, recursive: bool) -> list[FileInfo]:
        request = pb.ListRequest(path=fsencode(path), recursive=recursive)
        try:
            return [_file_info(info) for info in self._files.List(request)]
        except grpc.RpcError as err:
            raise agent_error(err, f"list {os.fsdecode(path)}") from err

    def makedirs(self, path: StrPath, *, mode: int) -> FileInfo:
        request = pb.MakeDirsRequest(path=fsencode(path), mode=mode)
        return _file_info(unary(self._files.MakeDirs, request, "mkdir", self._timeout))

    def remove(self, path: StrPath, *, recursive: bool, missing_ok: bool) -> bool:
        request = pb.RemoveRequest(path=fsencode(path), recursive=recursive, missing_ok=missing_ok)
        what = f"remove {os.fsdecode(path)}"
        return bool(unary(self._files.Remove, request, what, self._timeout).removed)

    def rename(self, source: StrPath, destination: StrPath, *, no_overwrite: bool) -> FileInfo:
        request = pb.RenameRequest(
            source=fsencode(source), destination=fsencode(destination), no_overwrite=no_overwrite
        )
        return _file_info(unary(self._files.Rename, request, "rename", self._timeout))

    # ------------------------------------------------------------------ transfers

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
        # The same guest on the port (or at the socket path) the agent opened for us.
        target = transport.sibling(self._address, port=reply.vsock_port, path=reply.unix_path)
        if target is None:
            self._data_channel = False
            return None
        sock = transport.connect(target, timeout=30)
        try:
            sock.sendall(ticket_line(reply.ticket))
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
        mode: int,
        mtime_ns: int,
        make_parents: bool,
        no_overwrite: bool,
        chunk_size: int,
    ) -> FileInfo:
        header = pb.UploadHeader(
            path=fsencode(remote),
            mode=mode,
            mtime_ns=mtime_ns,
            size=size,
            make_parents=make_parents,
            no_overwrite=no_overwrite,
            checksum=self._checksum,
        )
        what = f"upload to {os.fsdecode(remote)}"
        data = self._open_data_channel() if size >= DATA_CHANNEL_MIN else None
        if data is not None:
            header.ticket = data[1]
        failed: list[Exception] = []

        def parts() -> Iterator[pb.UploadRequest]:
            # Runs on grpc's request thread, which logs anything raised here with a traceback
            # ("Exception iterating requests!"): keep the failure for the caller instead and
            # end the stream without a trailer, which makes the agent discard the file.
            try:
                yield pb.UploadRequest(header=header)
                digest = new_hasher(self._checksum)
                sent = 0
                if data is not None:
                    sent = _send_raw(data[0], source, digest)
                    data[0].close()
                while data is None and (chunk := source.read(chunk_size)):
                    digest.update(chunk)
                    sent += len(chunk)
                    yield pb.UploadRequest(data=chunk)
                trailer = pb.TransferTrailer(digest=digest.digest(), size=sent)
                yield pb.UploadRequest(trailer=trailer)
            except Exception as err:
                failed.append(err)
                if data is not None:  # EOF for the agent, which would wait for the rest
                    data[0].close()

        try:
            return _file_info(self._files.Upload(parts()))
        except grpc.RpcError as err:
            # The agent closing the data channel (it refused the upload: a missing directory...)
            # is its answer's effect, not a cause: its status says why.
            closed_by_agent = failed and isinstance(failed[0], (BrokenPipeError, ConnectionError))
            if failed and not closed_by_agent and err.code() != grpc.StatusCode.UNAVAILABLE:
                # The local side failed first (reading the source): that is the cause; what
                # the agent says about the cut stream is the effect.
                raise AgentError(f"{what}: {failed[0]}") from failed[0]
            raise agent_error(err, what) from err
        finally:
            if data is not None:
                data[0].close()

    def download(self, remote: StrPath, sink: IO[bytes], *, size_hint: int | None) -> FileInfo:
        digest = new_hasher(self._checksum)
        received = 0
        header: FileInfo | None = None
        what = f"download of {os.fsdecode(remote)}"
        use_data = size_hint is None or size_hint >= DATA_CHANNEL_MIN
        data = self._open_data_channel() if use_data else None
        try:
            request = pb.DownloadRequest(
                path=fsencode(remote),
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
                    if header is None:
                        raise AgentError(f"{what}: trailer before any header", code="DATA_LOSS")
                    return header
        except grpc.RpcError as err:
            raise agent_error(err, what) from err
        finally:
            if data is not None:
                data[0].close()
        raise AgentError(f"{what}: stream ended without a trailer", code="DATA_LOSS")

    def read_bytes(self, remote: StrPath) -> bytes:
        sink = io.BytesIO()
        self.download(remote, sink, size_hint=0)
        return sink.getvalue()

    def write_bytes(self, remote: StrPath, data: bytes, *, mode: int) -> FileInfo:
        return self.upload(
            io.BytesIO(data),
            remote,
            size=len(data),
            mode=mode,
            mtime_ns=0,
            make_parents=True,
            no_overwrite=False,
            chunk_size=CHUNK_SIZE,
        )

    # ------------------------------------------------------------------ trees

    def put(
        self, local: bytes, remote: bytes, *, preserve: bool, make_parents: bool
    ) -> TransferStats:
        if not os.path.isdir(local):
            self._put_file(local, remote, preserve=preserve, make_parents=make_parents)
            return TransferStats(files=1, bytes=os.stat(local).st_size)
        files = size = dirs = 0
        for directory, subdirs, names in os.walk(local):
            rel = os.path.relpath(directory, local)
            target = remote if rel == b"." else os.path.join(remote, rel)
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
                no_overwrite=False,
                chunk_size=CHUNK_SIZE,
            )

    def get(self, remote: bytes, local: bytes, *, preserve: bool) -> TransferStats:
        info = self.stat(remote, follow_symlinks=True)
        if not info.is_dir:
            self._get_file(remote, local, preserve=preserve, size_hint=info.size)
            return TransferStats(files=1, bytes=info.size)
        os.makedirs(local, exist_ok=True)
        files = size = 0
        dirs = 1
        for entry in self.listdir(remote, recursive=True):
            _check_entry(remote, entry.path)
            target = os.path.join(local, entry.path)
            source = os.path.join(remote, entry.path)
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
            os.chmod(local, info.mode)
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


def _check_entry(remote: bytes, path: bytes) -> None:
    """A listed entry must stay below the directory being copied: the guest is not trusted
    with the host's file system (an absolute path or a ``..`` would write outside ``local``)."""
    parts = path.split(b"/")
    if not path or path.startswith(b"/") or b"\0" in path or b".." in parts or b"" in parts:
        raise AgentError(
            f"get {os.fsdecode(remote)}: the agent listed {os.fsdecode(path)!r}, which is not a "
            "path below that directory",
            code="DATA_LOSS",
        )
