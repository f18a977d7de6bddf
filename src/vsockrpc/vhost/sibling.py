"""The inter-device handshake that links two guests of a shared group (docs/device.md,
"Sibling routing"). One device runs per VM; devices of one group meet in the group's directory
(:mod:`~vsockrpc.vhost.groups`).

Guest A (CID a) connects to CID b port q. A's device finds ``<group>/b.sock`` in the first of
its groups that has it, connects, and writes one line::

    SIBLING <group> <a> <a's port> <q>\\n

B's device verifies it (bounded: 128 bytes within 2 s): the group is the one whose socket was
dialled; ``a`` is a guest CID other than b; ``SO_PEERCRED`` of the connection has our uid (or
root) and the pid written in ``<group>/a.pid`` — so a device can only ever claim its own CID,
and its guest can only claim that device's CID (packets whose ``src_cid`` is not the guest's
are dropped, virtio 1.2 5.10.6.1). B's device then sends guest B a REQUEST from ``a:<a's
port>``; on RESPONSE it writes ``OK\\n`` and A's device answers guest A's REQUEST. Any other
outcome closes the connection and guest A gets RST. From then on the socket carries the
stream's bytes, as a hybrid host connection does.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vsockrpc.errors import DeviceError
from vsockrpc.vhost.groups import GroupMember, check_group_name, read_member_pid
from vsockrpc.vhost.hybrid import CONNECT_TIMEOUT, read_line_step
from vsockrpc.vhost.link import Stream, link_pair
from vsockrpc.vhost.reactor import IN, Reactor

__all__ = [
    "MAX_HANDSHAKE",
    "MAX_PENDING_IN",
    "OK_LINE",
    "CoHosted",
    "RateLimitedLog",
    "SiblingHub",
    "parse_handshake",
    "peer_process",
]

log = logging.getLogger(__name__)

MAX_HANDSHAKE = 128  # bytes of the SIBLING line, newline included
MAX_PENDING_IN = 64  # handshakes being read at once (excess: closed at accept)
OK_LINE = b"OK\n"
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_U32 = 0xFFFFFFFF


def peer_process(sock: socket.socket) -> int | str:
    """The pid of the process at the other end of a Unix socket (``SO_PEERCRED``) if it runs as
    our user or as root, else why it is refused (a log phrase): processes of the same user are
    trusted (they could already ptrace us), no one else is."""
    try:
        pid, uid, _gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError as err:
        return f"no peer credentials ({err.strerror})"
    return pid if uid in (os.getuid(), 0) else f"connected as uid {uid}"


#: Called with a verified link: (socket, group, src_cid, src_port, dst_port); owns the socket.
OnSibling = Callable[[Stream, str, int, int, int], None]


class CoHosted:
    """The group members this process serves (one device process for several VMs, docs/
    device.md): ``(group, guest CID) → hub``. A dial to one of them needs no handshake (the
    process vouches for both CIDs) and no socket: the two guests are joined by an in-process
    link (:mod:`~vsockrpc.vhost.link`) on the shared reactor."""

    def __init__(self) -> None:
        self.hubs: dict[tuple[str, int], SiblingHub] = {}


class RateLimitedLog:
    """At most ``burst`` lines per ``interval`` seconds; then one line counting what was
    suppressed. A guest flooding refused connects cannot flood the log."""

    def __init__(self, level: int, *, burst: int = 10, interval: float = 10.0) -> None:
        self.level = level
        self.burst = burst
        self.interval = interval
        self._window = -interval
        self._count = 0
        self._suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window >= self.interval:
            if self._suppressed:
                log.log(self.level, "(%d similar lines suppressed)", self._suppressed)
            self._window, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            log.log(self.level, msg, *args)
        else:
            self._suppressed += 1


@dataclass(slots=True)
class _Pending:
    sock: socket.socket
    member: GroupMember
    deadline: float
    line: bytearray = field(default_factory=bytearray)


def parse_handshake(line: bytes) -> tuple[str, int, int, int] | None:
    """``SIBLING <group> <src_cid> <src_port> <dst_port>\\n`` → its fields, else None."""
    parts = line.rstrip(b"\n").split(b" ")
    if len(parts) != 5 or parts[0] != b"SIBLING" or not all(p.isdigit() for p in parts[2:]):
        return None
    if any(len(p) > 10 for p in parts[2:]):
        return None
    src_cid, src_port, dst_port = (int(p) for p in parts[2:])
    if src_port > _U32 or dst_port > _U32:
        return None
    try:
        group = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    return group, src_cid, src_port, dst_port


class SiblingHub:
    """This device's group memberships and both halves of the handshake."""

    def __init__(
        self,
        reactor: Reactor,
        groups_dir: str,
        names: Sequence[str],
        guest_cid: int,
        on_sibling: OnSibling,
        *,
        cohosted: CoHosted | None = None,
    ) -> None:
        self.reactor = reactor
        self.cohosted = cohosted
        self.groups_dir = groups_dir
        self.guest_cid = guest_cid
        self._on_sibling = on_sibling
        self.members: list[GroupMember] = []
        self._pending: dict[int, _Pending] = {}  # fd → incoming link awaiting its line
        self.refusals = RateLimitedLog(logging.WARNING)  # policy events, as in routes.py
        self.stats_accepted = 0
        self.stats_refused = 0
        try:
            for name in dict.fromkeys(names):  # a group named twice is joined once
                self.members.append(GroupMember(groups_dir, name, guest_cid))
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def start(self) -> None:
        for member in self.members:
            assert member.listener is not None
            if self.cohosted is not None:
                self.cohosted.hubs[member.name, self.guest_cid] = self
            self.reactor.register(
                member.listener.fileno(), IN, functools.partial(self._on_listener_event, member)
            )

    def stop(self) -> None:
        for member in self.members:
            if (
                self.cohosted is not None
                and self.cohosted.hubs.get((member.name, self.guest_cid)) is self
            ):
                del self.cohosted.hubs[member.name, self.guest_cid]
            if member.listener is not None:
                self.reactor.unregister(member.listener.fileno())
        for fd in list(self._pending):
            self._reject(fd, "")

    def close(self) -> None:
        self.stop()
        for member in self.members:
            member.close()
        self.members = []

    # ------------------------------------------------------------------ outgoing (A's side)
    def dial(self, dst_cid: int, src_port: int, dst_port: int) -> tuple[Stream, str] | str:
        """Connect to ``dst_cid``'s device in the first shared group that has it and send the
        handshake line: (socket, group), or why not (a log phrase). A member served by this
        same process is joined by an in-process link instead."""
        reason = "not in a shared group"
        for member in self.members:
            near = self.cohosted.hubs.get((member.name, dst_cid)) if self.cohosted else None
            if near is not None:
                ours, theirs = link_pair(self.reactor)
                near._on_sibling(theirs, member.name, self.guest_cid, src_port, dst_port)
                return ours, member.name
            path = os.path.join(member.directory, f"{dst_cid}.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                # A Unix stream connect completes at once or fails (EAGAIN: backlog full).
                sock.connect(path)
                line = f"SIBLING {member.name} {self.guest_cid} {src_port} {dst_port}\n".encode()
                if sock.send(line) != len(line):  # a fresh socket's buffer takes 128 bytes
                    raise BlockingIOError(errno.EAGAIN, "short send")
            except OSError as err:
                sock.close()
                if err.errno == errno.ENOENT:
                    continue
                reason = f"its device in group {member.name} does not answer ({err.strerror})"
                continue
            return sock, member.name
        return reason

    # ------------------------------------------------------------------ incoming (B's side)
    def _on_listener_event(self, member: GroupMember, mask: int) -> None:
        listener = member.listener
        assert listener is not None
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and friends: keep serving the rest
                log.warning("group %s: accept failed: %s", member.name, str(err))
                return
            if len(self._pending) >= MAX_PENDING_IN:
                sock.close()
                self._refused("group %s: too many sibling handshakes at once", member.name)
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._pending[fd] = _Pending(sock, member, time.monotonic() + CONNECT_TIMEOUT)
            self.reactor.register(fd, IN, functools.partial(self._on_pending_event, fd))

    def _on_pending_event(self, fd: int, mask: int) -> None:
        """Consume what arrived of the line, never a byte past its newline."""
        pending = self._pending[fd]
        sock = pending.sock
        done = read_line_step(sock, pending.line, MAX_HANDSHAKE)
        if done is None:
            too_long = len(pending.line) >= MAX_HANDSHAKE
            why = "handshake line too long" if too_long else "closed before its handshake"
            self._reject(fd, why)
            return
        if not done:
            return
        del self._pending[fd]
        self.reactor.unregister(fd)
        checked = self._verify(pending.member, sock, bytes(pending.line))
        if isinstance(checked, str):
            sock.close()
            self.stats_refused += 1
            self._refused("group %s: sibling handshake refused: %s", pending.member.name, checked)
            return
        self._on_sibling(sock, pending.member.name, *checked)

    def _verify(
        self, member: GroupMember, sock: socket.socket, line: bytes
    ) -> tuple[int, int, int] | str:
        """(src_cid, src_port, dst_port) of a handshake we trust, or why not."""
        fields = parse_handshake(line)
        if fields is None:
            return "malformed handshake line"
        group, src_cid, src_port, dst_port = fields
        if group != member.name:
            return f"names group {group!r} on group {member.name}'s socket"
        if not 2 < src_cid < _U32 or src_cid == self.guest_cid:
            return f"claims CID {src_cid}"
        pid = peer_process(sock)
        if isinstance(pid, str):
            return pid
        if pid <= 0 or read_member_pid(self.groups_dir, member.name, src_cid) != pid:
            return f"process {pid} is not the member with CID {src_cid}"
        return src_cid, src_port, dst_port

    def _reject(self, fd: int, why: str) -> None:
        pending = self._pending.pop(fd)
        self.reactor.unregister(fd)
        pending.sock.close()
        if why:
            self.stats_refused += 1
            self._refused("group %s: sibling link %s", pending.member.name, why)

    def _refused(self, msg: str, *args: object) -> None:
        self.refusals(msg, *args)

    # ------------------------------------------------------------------ timers
    def has_timers(self) -> bool:
        return bool(self._pending)

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)

    def expire(self, now: float) -> None:
        for fd in [fd for fd, p in self._pending.items() if p.deadline <= now]:
            self._reject(fd, "sent no handshake in time")


def open_hub(
    reactor: Reactor,
    groups_dir: str | None,
    names: Sequence[str],
    guest_cid: int,
    on_sibling: OnSibling,
    *,
    cohosted: CoHosted | None = None,
) -> SiblingHub | None:
    """The hub for ``names`` (None without groups); DeviceError on bad arguments."""
    if not names:
        return None
    if not groups_dir:
        raise DeviceError("groups need a groups directory (--groups-dir)")
    for name in names:
        try:
            check_group_name(name)
        except ValueError as err:
            raise DeviceError(f"group {err}") from None
    return SiblingHub(reactor, groups_dir, names, guest_cid, on_sibling, cohosted=cohosted)
