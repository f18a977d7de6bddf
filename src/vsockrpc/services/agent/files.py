"""The Files service: checksummed streamed transfers and the usual path operations.

Uploads are written to a temporary file in the target's directory (``.NAME.XXXX.part``),
checked (size and checksum from the trailer: SHA-256, or CRC-32 when asked), given their
mode and mtime, fsynced and renamed over the target; the directory is fsynced after the
rename. Any failure — a stream cut midway, a wrong checksum, a full disk — removes the
temporary file, so the target name holds either the old content or the complete new one,
never a partial file. Parent directories an upload creates (``make_parents``) are removed
again when it fails, and a ``NAME/..`` over a directory that does not exist yet is cancelled
rather than created (``/tmp/a/../b`` writes ``/tmp/b`` and leaves no empty ``/tmp/a``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator

import grpc

from vsockrpc.agent.checksum import Hasher, checksum_name, new_hasher
from vsockrpc.agent.datachannel import pipelined_copy
from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.services.agent._rpc import statuses
from vsockrpc.services.agent._status import Code, Status, check_path, from_os_error, show
from vsockrpc.services.agent.datachannel import DataChannels, DataSockets
from vsockrpc.services.agent.peers import PeerGuard

log = logging.getLogger("vsockrpc.agent.files")

DEFAULT_CHUNK = 256 * 1024
MAX_CHUNK = 1024 * 1024
_INVALID = Code.INVALID_ARGUMENT


def _file_type(mode: int) -> pb.FileType.ValueType:
    if stat.S_ISREG(mode):
        return pb.FILE_TYPE_REGULAR
    if stat.S_ISDIR(mode):
        return pb.FILE_TYPE_DIRECTORY
    if stat.S_ISLNK(mode):
        return pb.FILE_TYPE_SYMLINK
    return pb.FILE_TYPE_OTHER


def file_info(path: bytes, st: os.stat_result, *, shown_path: bytes | None = None) -> pb.FileInfo:
    info = pb.FileInfo(
        path=shown_path if shown_path is not None else path,
        type=_file_type(st.st_mode),
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        mtime_ns=st.st_mtime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
    )
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):
            info.symlink_target = os.readlink(path)
    return info


def _hasher(checksum: pb.Checksum.ValueType) -> Hasher:
    try:
        return new_hasher(checksum)
    except ValueError as err:
        raise Status(_INVALID, str(err)) from None


def _split_existing(path: bytes) -> tuple[bytes, list[bytes]]:
    """``path`` as its longest prefix that exists and the names after it that do not, with each
    ``NAME/..`` among those cancelled.

    Over an existing directory ``..`` is left to the kernel (which resolves it physically, e.g.
    through a symlink); over one that does not exist yet it can only mean "not this one", and
    creating NAME just to step out of it would leave an empty directory behind.
    """
    parts = [part for part in path.split(b"/") if part and part != b"."]
    existing = b"/"
    index = 0
    while index < len(parts) and os.path.lexists(os.path.join(existing, parts[index])):
        existing = os.path.join(existing, parts[index])
        index += 1
    missing: list[bytes] = []
    for part in parts[index:]:
        if part == b".." and missing and missing[-1] != b"..":
            missing.pop()
        else:
            missing.append(part)
    return existing, missing


def _make_parents(existing: bytes, missing: list[bytes]) -> list[bytes]:
    """Create the ``missing`` directories below ``existing``; returns those made, outermost first.

    ``os.makedirs`` would not say which it made, and those are what a failure must remove.
    """
    created: list[bytes] = []
    directory = existing
    try:
        for name in missing:
            directory = os.path.join(directory, name)
            try:
                os.mkdir(directory)
            except FileExistsError:
                continue  # raced, or `..`: not ours (a non-directory fails the next step)
            created.append(directory)
    except BaseException:  # e.g. a name too long further down: undo the ones made before it
        _remove_created(created)
        raise
    return created


def _remove_created(created: list[bytes]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):  # only while empty: never what someone else put there
            os.rmdir(directory)


def _fsync_dir(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NAME_MAX = 255  # bytes in one file name on Linux file systems (the temporary's is cut to fit)


def _idle(what: str, conn: socket.socket) -> Status:
    seconds = conn.gettimeout() or 0.0
    return Status(
        Code.DEADLINE_EXCEEDED, f"{what}: the data channel moved nothing for {seconds:g} s"
    )


class FilesServicer(pb_grpc.FilesServicer):
    """``vsockrpc.agent.v1.Files``: paths are absolute bytes; see the module docstring.

    ``guard`` finds the caller's address for data channels and admits their connections;
    ``sockets`` (:mod:`vsockrpc.transport`, injected by the server's starter) opens them: without
    it, transfers go in-band.
    """

    def __init__(self, guard: PeerGuard, sockets: DataSockets | None = None) -> None:
        self._guard = guard
        self.data = DataChannels(guard.admits, sockets)

    def close(self) -> None:
        self.data.close()

    def OpenDataChannel(
        self, request: pb.OpenDataChannelRequest, context: grpc.ServicerContext
    ) -> pb.DataChannel:
        with statuses(context, "OpenDataChannel"):
            port, path, ticket = self.data.open(self._guard.caller(context))
            return pb.DataChannel(vsock_port=port, unix_path=path, ticket=ticket)
        raise AssertionError("unreachable")  # pragma: no cover

    def Upload(
        self, request_iterator: Iterator[pb.UploadRequest], context: grpc.ServicerContext
    ) -> pb.FileInfo:
        with statuses(context, "Upload"):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise Status(_INVALID, "the first Upload message must be the header")
            try:
                return self._upload(first.header, request_iterator)
            finally:
                if first.header.ticket:  # a call that failed before taking its connection
                    self.data.discard(first.header.ticket)
        raise AssertionError("unreachable")  # pragma: no cover

    def _upload(self, header: pb.UploadHeader, parts: Iterator[pb.UploadRequest]) -> pb.FileInfo:
        path = check_path(header.path)
        parent, name = os.path.split(path)
        # Checked before any byte is received: these used to fail at the final rename, after
        # the whole upload, with a message naming the temporary file.
        if not name or name in (b".", b".."):  # "" : "DIR/" names a directory
            raise Status(_INVALID, f"path {show(path)} does not name a file")
        if len(name) > NAME_MAX:
            raise Status(_INVALID, f"path {show(path)}: file name longer than {NAME_MAX} bytes")
        if not header.make_parents:
            if not os.path.isdir(parent):
                raise Status(Code.NOT_FOUND, f"directory {show(parent)} does not exist")
            return self._write(header, path, parent, name, parts)
        existing, missing = _split_existing(parent)
        parent = os.path.join(existing, *missing) if missing else existing
        created = _make_parents(existing, missing)
        try:
            return self._write(header, os.path.join(parent, name), parent, name, parts)
        except BaseException:
            _remove_created(created)
            raise

    def _write(
        self,
        header: pb.UploadHeader,
        path: bytes,
        parent: bytes,
        name: bytes,
        parts: Iterator[pb.UploadRequest],
    ) -> pb.FileInfo:
        """Receive the file into a temporary beside ``path``; rename it there once verified."""
        if os.path.isdir(path):
            raise Status(Code.FAILED_PRECONDITION, f"{show(path)} is an existing directory")
        if header.no_overwrite and os.path.lexists(path):
            raise Status(Code.ALREADY_EXISTS, f"{show(path)} already exists")
        digest = _hasher(header.checksum)
        try:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=b"." + name[:64] + b".", suffix=b".part")
        except OSError as err:  # e.g. a parent that is a dangling symlink: name it, not the temp
            raise from_os_error(err, f"upload to {show(path)}") from err
        tmp_path: bytes | None = tmp
        try:
            received = 0
            trailer: pb.TransferTrailer | None = None
            if header.ticket:
                received = self._receive_raw(header, fd, digest)
                if received != header.size:
                    raise Status(
                        Code.DATA_LOSS,
                        f"upload of {show(path)}: data channel closed after {received} of "
                        f"{header.size} bytes",
                    )
                log.info("upload of %s came over a data channel", show(path))
            for request in parts:
                kind = request.WhichOneof("part")
                if kind == "data" and not header.ticket:
                    received += len(request.data)
                    if received > header.size:
                        raise Status(_INVALID, f"more data than the {header.size} bytes announced")
                    digest.update(request.data)
                    view = memoryview(request.data)
                    while view:
                        view = view[os.write(fd, view) :]
                elif kind == "trailer":
                    trailer = request.trailer
                    break
                else:
                    raise Status(_INVALID, f"unexpected {kind!r} message in an upload")
            if trailer is None:
                raise Status(
                    Code.DATA_LOSS,
                    f"upload of {show(path)} ended after {received} of {header.size} bytes",
                )
            if received != header.size or trailer.size != received:
                raise Status(
                    Code.DATA_LOSS,
                    f"upload of {show(path)}: received {received} bytes, "
                    f"announced {header.size}, trailer says {trailer.size}",
                )
            if digest.digest() != trailer.digest:
                raise Status(Code.DATA_LOSS, f"upload of {show(path)}: checksum mismatch")
            os.fchmod(fd, (header.mode & 0o7777) or 0o644)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            if header.mtime_ns:
                os.utime(tmp, ns=(header.mtime_ns, header.mtime_ns))
            if header.no_overwrite and os.path.lexists(path):
                raise Status(Code.ALREADY_EXISTS, f"{show(path)} already exists")
            os.replace(tmp, path)
            tmp_path = None
            _fsync_dir(parent)
            log.info(
                "uploaded %s (%d bytes, %s)", show(path), received, checksum_name(header.checksum)
            )
            return file_info(path, os.stat(path))
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_path)

    def _receive_raw(self, header: pb.UploadHeader, fd: int, digest: Hasher) -> int:
        """Copy ``header.size`` bytes from the data channel into ``fd``; returns the count.

        The socket is read on this thread while another checksums and writes the file.
        """
        conn = self.data.take(header.ticket)
        left = header.size

        def fill(view: memoryview) -> int:
            nonlocal left
            # 0 at the end, or when the stream is cut short: DATA_LOSS with the sizes, later.
            n = conn.recv_into(view, min(len(view), left)) if left else 0
            left -= n
            return n

        def drain(view: memoryview) -> None:
            digest.update(view)
            while view:
                view = view[os.write(fd, view) :]

        try:
            return pipelined_copy(fill, drain, fill_in_thread=False)
        except TimeoutError:
            raise _idle("upload", conn) from None
        finally:
            conn.close()

    def _send_raw(self, ticket: str, fd: int, digest: Hasher) -> int:
        """Copy the file ``fd`` to the data channel and close it; returns the count.

        Another thread reads and checksums the file while this one sends.
        """
        conn = self.data.take(ticket)

        def fill(view: memoryview) -> int:
            n = os.readv(fd, [view])
            digest.update(view[:n])
            return n

        try:
            sent = pipelined_copy(fill, conn.sendall, fill_in_thread=True)
            conn.shutdown(socket.SHUT_WR)
        except TimeoutError:
            raise _idle("download", conn) from None
        finally:
            conn.close()
        return sent

    def Download(
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadResponse]:
        try:
            yield from self._download(request, context)
        finally:
            if request.ticket:  # a call that failed before taking its connection
                self.data.discard(request.ticket)

    def _download(
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadResponse]:
        with statuses(context, "Download"):
            path = check_path(request.path)
            chunk = min(request.chunk_size or DEFAULT_CHUNK, MAX_CHUNK)
            digest = _hasher(request.checksum)
            # O_NONBLOCK: opening a FIFO for reading would wait for a writer, holding one of the
            # server's workers past the call's deadline; it is refused below instead.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise Status(Code.FAILED_PRECONDITION, f"{show(path)} is not a regular file")
                os.set_blocking(fd, True)
                yield pb.DownloadResponse(header=file_info(path, st))
                sent = 0
                if request.ticket:
                    sent = self._send_raw(request.ticket, fd, digest)
                    log.info(
                        "download of %s went over a data channel (%d bytes, %s)",
                        show(path),
                        sent,
                        checksum_name(request.checksum),
                    )
                while not request.ticket:
                    data = os.read(fd, chunk)
                    if not data:
                        break
                    digest.update(data)
                    sent += len(data)
                    yield pb.DownloadResponse(data=data)
                yield pb.DownloadResponse(
                    trailer=pb.TransferTrailer(digest=digest.digest(), size=sent)
                )
            finally:
                os.close(fd)

    def Stat(self, request: pb.StatRequest, context: grpc.ServicerContext) -> pb.FileInfo:
        with statuses(context, "Stat"):
            path = check_path(request.path)
            st = os.stat(path) if request.follow_symlinks else os.lstat(path)
            return file_info(path, st)
        raise AssertionError("unreachable")  # pragma: no cover

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> Iterator[pb.FileInfo]:
        with statuses(context, "List"):
            root = check_path(request.path)
            if not os.path.isdir(root):
                if not os.path.lexists(root):
                    raise Status(Code.NOT_FOUND, f"{show(root)}: no such directory")
                raise Status(Code.FAILED_PRECONDITION, f"{show(root)} is not a directory")
            pending: list[bytes] = [b""]
            while pending:
                rel_dir = pending.pop(0)
                directory = os.path.join(root, rel_dir) if rel_dir else root
                with os.scandir(directory) as entries:
                    listed = sorted(entries, key=lambda e: e.name)
                subdirs = []
                for entry in listed:
                    rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # vanished while listing
                        continue
                    yield file_info(entry.path, st, shown_path=rel)
                    if request.recursive and stat.S_ISDIR(st.st_mode):
                        subdirs.append(rel)
                pending[0:0] = subdirs

    def MakeDirs(self, request: pb.MakeDirsRequest, context: grpc.ServicerContext) -> pb.FileInfo:
        with statuses(context, "MakeDirs"):
            path = check_path(request.path)
            existing, missing = _split_existing(path)
            path = os.path.join(existing, *missing) if missing else existing
            try:
                os.makedirs(path, mode=(request.mode & 0o7777) or 0o755, exist_ok=True)
            except FileExistsError:
                raise Status(
                    Code.ALREADY_EXISTS, f"{show(path)} exists and is not a directory"
                ) from None
            return file_info(path, os.stat(path))
        raise AssertionError("unreachable")  # pragma: no cover

    def Remove(self, request: pb.RemoveRequest, context: grpc.ServicerContext) -> pb.RemoveResponse:
        with statuses(context, "Remove"):
            path = check_path(request.path)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if request.missing_ok:
                    return pb.RemoveResponse(removed=False)
                raise Status(Code.NOT_FOUND, f"{show(path)}: no such file") from None
            # By identity, not by spelling: "//", "/tmp/..", "/proc/self/root/" and a symlink
            # to / with a trailing slash all name the root directory.
            root = os.stat(b"/")
            if (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino):
                raise Status(_INVALID, f"refusing to remove {show(path)}: it is '/'")
            if stat.S_ISDIR(st.st_mode):
                if request.recursive:
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
            log.info("removed %s", show(path))
            return pb.RemoveResponse(removed=True)
        raise AssertionError("unreachable")  # pragma: no cover

    def Rename(self, request: pb.RenameRequest, context: grpc.ServicerContext) -> pb.FileInfo:
        with statuses(context, "Rename"):
            source = check_path(request.source, "source")
            destination = check_path(request.destination, "destination")
            if not os.path.lexists(source):
                raise Status(Code.NOT_FOUND, f"{show(source)}: no such file")
            if request.no_overwrite and os.path.lexists(destination):
                raise Status(Code.ALREADY_EXISTS, f"{show(destination)} already exists")
            os.rename(source, destination)
            return file_info(destination, os.lstat(destination))
        raise AssertionError("unreachable")  # pragma: no cover
