"""The group host's join protocol, both halves' shared parts and the launcher's side
(:func:`join_host`): what a VM launcher needs without importing the device itself. The host is
:mod:`~vsockrpc.vhost.hosting`, whose docstring describes the protocol."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vsockrpc.errors import DeviceError
from vsockrpc.vhost.groups import SUN_PATH_MAX, check_group_name, ensure_private_dir

__all__ = [
    "HOST_PID",
    "HOST_SOCKET",
    "IDLE_EXIT",
    "JOIN_TIMEOUT",
    "MAX_FDS",
    "MAX_HELD",
    "MAX_PENDING",
    "MAX_REQUEST",
    "HostStartError",
    "JoinRequest",
    "host_paths",
    "join_host",
    "lock_joins",
    "parse_request",
]

HOST_SOCKET = "host.sock"
HOST_PID = "host.pid"
MAX_PENDING = 16  # joins being read at once (excess: closed at accept)
MAX_REQUEST = 4096  # bytes of the JSON line, newline included
MAX_HELD = 4  # fds a VM's device keeps open for the launcher (its locks)
MAX_FDS = 2 + MAX_HELD
JOIN_TIMEOUT = 5.0  # seconds for a launcher to send its whole request
IDLE_EXIT = 1.0  # seconds without a VM before the host exits


class HostStartError(DeviceError):
    """The group's host, started for this join, did not come up (it says why in its log)."""


def host_paths(groups_dir: str, group: str) -> tuple[str, str]:
    """``(host.sock, host.pid)`` of ``group``'s host."""
    directory = os.path.join(groups_dir, group)
    return os.path.join(directory, HOST_SOCKET), os.path.join(directory, HOST_PID)


def lock_joins(directory: str, *, wait: bool) -> int | None:
    """The join lock: an exclusive ``flock`` on the group directory itself (no file to create
    or remove). A launcher holds it (``wait=True``) from its connect to the host's answer; the
    host takes it (``wait=False``: None if busy) before it stops accepting joins. The fd holds
    the lock until closed."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class JoinRequest:
    cid: int
    uds: str
    groups: tuple[str, ...]
    exit_with_pid: int | None


def parse_request(line: bytes, group: str) -> JoinRequest | str:
    """The request in ``line``, or why it is refused (a log phrase). The VM's first group must
    be this host's: a VM is served by the host of its first group."""
    try:
        raw = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return "not a JSON request"
    if not isinstance(raw, dict) or set(raw) != {"cid", "uds", "groups", "exit_with_pid"}:
        return "not a join request"
    cid, uds, groups, pid = raw["cid"], raw["uds"], raw["groups"], raw["exit_with_pid"]
    if type(cid) is not int or not 2 < cid < 0xFFFFFFFF:
        return f"bad guest CID {cid!r}"
    if not isinstance(uds, str) or not os.path.isabs(uds) or "\0" in uds:
        return "bad hybrid socket path"
    if len(uds.encode()) > SUN_PATH_MAX:
        return "hybrid socket path too long"
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        return "bad groups"
    for name in groups:
        try:
            check_group_name(name)
        except ValueError as err:
            return str(err)
    if groups[0] != group:
        return f"its first group is {groups[0]!r}, not {group!r}"
    if pid is not None and (type(pid) is not int or pid <= 0):
        return f"bad pid {pid!r}"
    return JoinRequest(cid, uds, tuple(dict.fromkeys(groups)), pid)


# ---------------------------------------------------------------------- the launcher's side
def join_host(
    groups_dir: str,
    groups: Sequence[str],
    *,
    cid: int,
    uds: str,
    exit_with_pid: int | None,
    fds: Sequence[int],
    start_host: Callable[[], subprocess.Popen[bytes]],
    timeout: float = 10.0,
) -> tuple[socket.socket, int]:
    """Bring a VM to the host of its first group: ``(connection, host pid)``. ``fds``: its
    listening vhost-user and hybrid sockets, then the fds its device keeps (module docstring).
    With no host listening, ``start_host()`` starts one (under the join lock, so at most one
    starts): a ``--fork-when-ready`` host, whose first process exits 0 once it listens.
    DeviceError says why the VM was not taken."""
    group = groups[0]
    directory = os.path.join(groups_dir, group)
    path, _pid_path = host_paths(groups_dir, group)
    if len(path.encode()) > SUN_PATH_MAX:
        raise DeviceError(f"groups directory {groups_dir}: too long for the host socket path")
    ensure_private_dir(directory)
    line = json.dumps(
        {"cid": cid, "uds": uds, "groups": list(groups), "exit_with_pid": exit_with_pid}
    )
    deadline = time.monotonic() + timeout
    lock = lock_joins(directory, wait=True)
    assert lock is not None  # waited for
    try:
        sock = _connect(path)
        if sock is None:
            started = start_host()
            try:
                code = started.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                started.kill()
                started.wait()
                raise HostStartError(
                    f"group {group}'s device host did not start in {timeout:.0f} s"
                ) from None
            if code != 0:
                raise HostStartError(f"group {group}'s device host exited with status {code}")
            sock = _connect(path)
            if sock is None:
                raise DeviceError(f"group {group}'s device host is not listening")
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            socket.send_fds(sock, [(line + "\n").encode()], fds)
            reply = _read_line(sock)
        except BaseException:
            sock.close()
            raise
    except OSError as err:
        raise DeviceError(f"group {group}'s device host: {err.strerror or err}") from err
    finally:
        os.close(lock)
    word, _, rest = reply.partition(" ")
    if word == "OK" and rest.isdigit():
        sock.settimeout(None)
        sock.setblocking(False)
        return sock, int(rest)
    sock.close()
    if word == "ERR" and rest:
        raise DeviceError(f"group {group}'s device host refused the VM: {rest}")
    raise DeviceError(f"group {group}'s device host closed the connection without an answer")


def _connect(path: str) -> socket.socket | None:
    """A connection to the host, or None when nobody listens there (no file, a stale one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return sock


def _read_line(sock: socket.socket) -> str:
    """The host's one-line answer ("" at EOF), never a byte past its newline."""
    data = bytearray()
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
