"""Typed results and events of the SDK (plain frozen dataclasses, no protobuf in sight)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Started:
    """The process is running: ``process_id`` is the agent's handle for attach and signals."""

    process_id: str
    pid: int
    attached: bool = False


@dataclass(frozen=True, slots=True)
class Stdout:
    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    data: bytes


@dataclass(frozen=True, slots=True)
class Exited:
    """Last event: ``exit_code`` for a normal exit, else ``signal`` (the killing signal)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool = False

    @property
    def status(self) -> int:
        """Shell-style status: the exit code, or 128 + signal."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)


ExecEvent = Started | Stdout | Stderr | Exited


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What :meth:`Guest.run` collected."""

    argv: list[bytes]
    pid: int
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def status(self) -> int:
        """Shell-style status: the exit code, or 128 + signal."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)


class FileType(enum.Enum):
    UNKNOWN = 0
    REGULAR = 1
    DIRECTORY = 2
    SYMLINK = 3
    OTHER = 4


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A guest file's metadata. ``path`` is absolute, or relative to the root for listings."""

    path: bytes
    type: FileType
    size: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    symlink_target: bytes = b""

    @property
    def is_dir(self) -> bool:
        return self.type is FileType.DIRECTORY


@dataclass(frozen=True, slots=True)
class GuestInfo:
    agent_version: str
    kernel_release: str
    kernel_version: str
    machine: str
    hostname: str
    os_pretty_name: str
    cpus: int
    memory_total_bytes: int
    memory_available_bytes: int
    uptime_seconds: float
    time_ns: int
    agent_pid: int
    python_version: str
    os_release: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProcessSummary:
    process_id: str
    pid: int
    argv: list[bytes]
    attached: bool
    running: bool
    pty: bool


@dataclass(frozen=True, slots=True)
class TransferStats:
    """Totals of a put/get: files copied, bytes moved, directories created."""

    files: int = 0
    bytes: int = 0
    directories: int = 0
