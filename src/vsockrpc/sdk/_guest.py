"""The synchronous Python SDK: :class:`Guest`, one agent connection.

``Guest`` is the public surface; it composes one sub-client per agent service
(:class:`~._exec.ExecClient`, :class:`~._files.FilesClient`, :class:`~._system.SystemClient`)
over one channel, and each of its methods hands over to one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

import grpc

from vsockrpc._checks import seconds
from vsockrpc.addresses import Address, parse_address
from vsockrpc.agent.checksum import CHECKSUMS
from vsockrpc.errors import AgentError, BadInputError
from vsockrpc.sdk._common import CHUNK_SIZE, Arg, StrPath, fsencode
from vsockrpc.sdk._exec import ExecClient
from vsockrpc.sdk._files import FilesClient
from vsockrpc.sdk._process import Process, StdinSource
from vsockrpc.sdk._system import SystemClient
from vsockrpc.sdk._types import ExecResult, FileInfo, GuestInfo, ProcessSummary, TransferStats

if TYPE_CHECKING:
    from vsockrpc.forward import Forwarder

__all__ = ["CHUNK_SIZE", "Guest", "Process"]

Checksum = Literal["sha256", "crc32"]


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
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {sorted(CHECKSUMS)}, not {checksum!r}")
        seconds(wait, "wait", zero=True)
        seconds(call_timeout, "call_timeout")
        self._owned: Any = None
        address: Address | None = None
        self._address: Address | None = None
        if isinstance(target, grpc.Channel):
            channel = target
        else:
            address = self._address = parse_address(target)
            from vsockrpc import rpc

            self._owned = rpc.channel(address)
            channel = self._owned
            if wait > 0:
                try:
                    rpc.channel_ready(channel, timeout=wait, what=str(target))
                except BaseException:
                    self._owned.close()
                    raise
        self._exec = ExecClient(channel, call_timeout)
        self._files = FilesClient(
            channel,
            call_timeout,
            checksum=CHECKSUMS[checksum],
            address=address,
            data_channel=data_channel,
        )
        self._system = SystemClient(channel, call_timeout)

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
        return self._exec.exec_stream(
            argv,
            stdin=stdin,
            env=env,
            inherit_env=inherit_env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            pty=pty,
            window=window,
            term=term,
            keep_alive=keep_alive,
        )

    def attach(self, process_id: str) -> Process:
        """Resume streaming a ``keep_alive`` process whose earlier stream ended."""
        return self._exec.attach(process_id)

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
        return self._exec.run(
            argv,
            input=input,
            check=check,
            env=env,
            inherit_env=inherit_env,
            cwd=cwd,
            user=user,
            timeout=timeout,
        )

    def signal(self, process_id: str, signum: int) -> None:
        self._exec.signal(process_id, signum)

    def processes(self) -> list[ProcessSummary]:
        return self._exec.processes()

    # ------------------------------------------------------------------ files

    def stat(self, path: StrPath, *, follow_symlinks: bool = False) -> FileInfo:
        return self._files.stat(path, follow_symlinks=follow_symlinks)

    def exists(self, path: StrPath) -> bool:
        return self._files.exists(path)

    def listdir(self, path: StrPath, *, recursive: bool = False) -> list[FileInfo]:
        """Entries of a guest directory (paths relative to it), parents before children."""
        return self._files.listdir(path, recursive=recursive)

    def makedirs(self, path: StrPath, *, mode: int = 0o755) -> FileInfo:
        return self._files.makedirs(path, mode=mode)

    def remove(self, path: StrPath, *, recursive: bool = False, missing_ok: bool = False) -> bool:
        return self._files.remove(path, recursive=recursive, missing_ok=missing_ok)

    def rename(
        self, source: StrPath, destination: StrPath, *, no_overwrite: bool = False
    ) -> FileInfo:
        return self._files.rename(source, destination, no_overwrite=no_overwrite)

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
        if not 1 <= chunk_size <= CHUNK_SIZE * 3:  # a message must stay under gRPC's 4 MiB
            raise BadInputError(f"chunk_size must be 1 to {CHUNK_SIZE * 3} bytes, not {chunk_size}")
        return self._files.upload(
            source,
            remote,
            size=size,
            mode=mode,
            mtime_ns=mtime_ns,
            make_parents=make_parents,
            no_overwrite=no_overwrite,
            chunk_size=chunk_size,
        )

    def download(
        self, remote: StrPath, sink: IO[bytes], *, size_hint: int | None = None
    ) -> FileInfo:
        """Stream the guest file ``remote`` into ``sink``; raises DATA_LOSS on a bad checksum.

        Returns the file's metadata as the agent saw it when the download began. A raw data
        channel is used unless ``size_hint`` says the file is small.
        """
        return self._files.download(remote, sink, size_hint=size_hint)

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
        return self._files.put(
            fsencode(local), fsencode(remote), preserve=preserve, make_parents=make_parents
        )

    def get(self, remote: StrPath, local: StrPath, *, preserve: bool = True) -> TransferStats:
        """Copy the guest file or directory tree ``remote`` to the host path ``local``.

        Each file is written to a temporary file beside its target and renamed into place
        after the checksum matched: a failed transfer leaves no partial file behind.
        """
        return self._files.get(fsencode(remote), fsencode(local), preserve=preserve)

    def read_bytes(self, remote: StrPath) -> bytes:
        """The whole content of a (small) guest file."""
        return self._files.read_bytes(remote)

    def write_bytes(self, remote: StrPath, data: bytes, *, mode: int = 0o644) -> FileInfo:
        """Replace the guest file ``remote`` with ``data`` (atomically, checksummed)."""
        return self._files.write_bytes(remote, data, mode=mode)

    # ------------------------------------------------------------------ forwarding

    def forward(self, listen: Address | str, *, to: int, mode: int = 0o600) -> Forwarder:
        """Accept on the host's ``listen`` (``tcp:127.0.0.1:8080``, ``unix:PATH``) and connect
        each connection to guest port ``to``: a :class:`~vsockrpc.forward.Forwarder`, already
        accepting, to close (or use in ``with``). Needs a Guest made from an address."""
        from vsockrpc.forward import forward

        return forward(self._agent_address("forward"), listen=listen, to=to, mode=mode)

    def expose(self, target: Address | str, *, port: int, mode: int = 0o600) -> Forwarder:
        """Let the guest reach the host's ``target`` (``unix:PATH``, ``tcp:HOST:PORT``) by
        connecting to CID 2 port ``port`` (hybrid devices); a :class:`Forwarder` to close."""
        from vsockrpc.forward import expose

        return expose(self._agent_address("expose"), target, port=port, mode=mode)

    def _agent_address(self, what: str) -> Address:
        if self._address is None:
            raise AgentError(f"Guest.{what} needs a Guest made from an address, not a channel")
        return self._address

    # ------------------------------------------------------------------ system

    def ping(self, payload: bytes = b"") -> float:
        """Round-trip time of one Ping, in seconds."""
        return self._system.ping(payload)

    def info(self) -> GuestInfo:
        return self._system.info()

    def sync_time(self) -> float:
        """Set the guest clock to the host's; returns how far off it was (guest - host, s)."""
        return self._system.sync_time()

    def shutdown(self, *, reboot: bool = False) -> None:
        """Ask the guest to power off (or reboot); returns once the agent acknowledged."""
        self._system.shutdown(reboot=reboot)
