"""The group host: one device process serving every VM whose first group is its group
(docs/device.md, "One process per group"), so that a byte between two of them crosses one
process and no socket (:mod:`~vsockrpc.vhost.link`).

``python -m vsockrpc.vhost --host GROUP --groups-dir DIR`` runs it. In ``DIR/GROUP/`` it holds
an exclusive ``flock`` on ``host.pid`` for its whole life (one host per group; the pid file is
written before the socket exists) and listens on ``host.sock`` (mode 0600) for launchers that
bring it a VM. A join is one message: a JSON line ::

    {"cid": 5, "uds": "/run/…/vsock.sock", "groups": ["GROUP", …], "exit_with_pid": 1234}

with ``SCM_RIGHTS`` file descriptors: the VM's listening vhost-user socket, its listening hybrid
socket, then up to :data:`MAX_HELD` fds the VM's device keeps open while it lives (the
launcher's CID lease and name claim). The host answers ``OK <pid>\\n`` (serving the VM from then
on, as ``--exit-on-disconnect`` device) or ``ERR <reason>\\n`` and closes.

The connection stays open after ``OK``: the host closes it when the VM's device leaves, which
is how the launcher learns of it. Once QEMU has started, the launcher sends ``WATCH <pid>\\n``
and the host stops the VM's device when that process exits, whether or not QEMU ever connected;
a launcher that closes the connection before that (it failed or was killed while starting QEMU)
and before QEMU connected takes its VM along. A detached launcher closes it after ``WATCH``;
the VM's device then lives until QEMU disconnects or exits (or ``exit_with_pid`` does).

Bounds: :data:`MAX_PENDING` joins being read at once, :data:`MAX_REQUEST` bytes and
:data:`JOIN_TIMEOUT` seconds each, peers of our uid (or root) only. The host exits once it has
served no VM for :data:`IDLE_EXIT` seconds (from its start, or since its last VM left), taking
the join lock first (:func:`lock_joins`): a launcher holds it from its connect (or its start of
a new host) to the answer, so no join is ever in flight to a host that is going away.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from vsockrpc.errors import DeviceError
from vsockrpc.vhost.device import DeviceLoop, VsockDevice
from vsockrpc.vhost.groups import (
    SUN_PATH_MAX,
    ensure_private_dir,
    lock_pid_file,
    read_pid_file,
    release_pid_file,
)
from vsockrpc.vhost.hostproto import (
    IDLE_EXIT,
    JOIN_TIMEOUT,
    MAX_FDS,
    MAX_PENDING,
    MAX_REQUEST,
    host_paths,
    lock_joins,
    parse_request,
)
from vsockrpc.vhost.hybrid import PendingClient
from vsockrpc.vhost.paths import BoundPath, close_fds, listen_unix, unix_stream_from_fd
from vsockrpc.vhost.reactor import ERR, IN, Reactor
from vsockrpc.vhost.sibling import CoHosted, peer_process

__all__ = ["IDLE_EXIT", "GroupHost"]

log = logging.getLogger(__name__)


@dataclass
class _Member:
    """A VM this host serves: its launcher's connection and the fds its device keeps."""

    conn: socket.socket
    held: list[int]
    line: bytearray = field(default_factory=bytearray)  # a command line arriving
    watched: bool = False  # its QEMU is watched: the connection is no longer its lease


class GroupHost:
    """The group host (module docstring). :meth:`serve` runs it until it has been idle for
    ``idle_exit`` seconds or :meth:`stop`; :meth:`close` releases everything."""

    def __init__(
        self,
        groups_dir: str,
        group: str,
        *,
        buf_alloc: int,
        max_connections: int,
        idle_exit: float = IDLE_EXIT,
    ) -> None:
        self.groups_dir = groups_dir
        self.group = group
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self.idle_exit = idle_exit
        self.reactor = Reactor()
        self.cohosted = CoHosted()
        self.loop = DeviceLoop(self.reactor, on_leave=self._left, hooks=self)
        self.socket_path, self.pid_path = host_paths(groups_dir, group)
        self._pending: dict[int, PendingClient] = {}
        self._members: dict[VsockDevice, _Member] = {}
        self._idle_since = time.monotonic()
        self._stop_requested = False
        self._pid_fd: int | None = None
        self._retire_fd: int | None = None  # the join lock, held from retiring to exit
        self._listener: socket.socket | None = None
        self._bound: BoundPath | None = None
        try:
            if len(self.socket_path.encode()) > SUN_PATH_MAX:
                raise DeviceError(f"--groups-dir {groups_dir}: too long for the host socket path")
            ensure_private_dir(os.path.dirname(self.socket_path))
            self._pid_fd = lock_pid_file(
                self.pid_path,
                f"group {group}'s host",
                busy=f"group {group} already has a device host "
                f"(pid {read_pid_file(self.pid_path) or 'unknown'})",
            )
            self._listener, self._bound = listen_unix(self.socket_path, mode=0o600)
            self._listener.setblocking(False)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    def forked(self) -> None:
        """In the child of a fork after start (``--fork-when-ready``): the pid file names us.
        The child shares the parent's open pid file, so it holds the same lock."""
        assert self._pid_fd is not None
        os.ftruncate(self._pid_fd, 0)
        os.pwrite(self._pid_fd, f"{os.getpid()}\n".encode(), 0)

    def serve(self) -> None:
        assert self._listener is not None
        self.reactor.register(self._listener.fileno(), IN, lambda _m: self._on_accept())
        log.info("device host of group %s: listening", self.group)
        self.loop.run()

    def stop(self) -> None:
        """Stop serving every VM and exit (thread- and signal-safe)."""
        self._stop_requested = True
        self.loop.stop()

    def close(self) -> None:
        self._shut_door()
        for fd in list(self._pending):
            self._reject(fd, "")
        for device in list(self._members):
            self._left(device)
        pid_fd, self._pid_fd = self._pid_fd, None
        if pid_fd is not None:
            release_pid_file(pid_fd, self.pid_path, os.getpid())
        retire_fd, self._retire_fd = self._retire_fd, None
        if retire_fd is not None:
            os.close(retire_fd)
        self.reactor.close()

    def _shut_door(self) -> None:
        """Stop accepting joins and remove host.sock if it is still ours."""
        if self._listener is not None:
            self.reactor.unregister(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._bound is not None:
            with contextlib.suppress(OSError):
                self._bound.unlink()
            self._bound = None

    # ------------------------------------------------------------------ loop hooks
    def next_deadline(self) -> float | None:
        times = [p.deadline for p in self._pending.values()]
        if not self.loop.devices and not self._pending:
            times.append(self._idle_since + self.idle_exit)
        return min(times, default=None)

    def expire(self, now: float) -> None:
        for fd in [fd for fd, p in self._pending.items() if p.deadline <= now]:
            self._reject(fd, "sent no complete request in time")

    def finished(self) -> bool:
        """No VM left: exit if stopped, or once idle long enough and no launcher is joining
        (then it shuts the door first, holding the join lock until it exits)."""
        if self._stop_requested:
            return True
        if self._pending or time.monotonic() - self._idle_since < self.idle_exit:
            return False
        fd = lock_joins(os.path.dirname(self.socket_path), wait=False)
        if fd is None:  # a launcher is joining: look again soon
            self._idle_since = time.monotonic() - self.idle_exit + 0.05
            return False
        self._retire_fd = fd
        self._shut_door()
        log.info("device host of group %s: no VM for %.0f s, exiting", self.group, self.idle_exit)
        return True

    # ------------------------------------------------------------------ joins
    def _on_accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and friends: keep serving
                log.warning("device host of group %s: accept failed: %s", self.group, err)
                return
            peer = peer_process(sock)
            why = peer if isinstance(peer, str) else ""
            if why or len(self._pending) >= MAX_PENDING:
                log.warning("device host of group %s: join refused: %s", self.group, why or "busy")
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._pending[fd] = PendingClient(sock, time.monotonic() + JOIN_TIMEOUT)
            self.reactor.register(fd, IN | ERR, functools.partial(self._on_join_data, fd))

    def _on_join_data(self, fd: int, mask: int) -> None:
        pending = self._pending[fd]
        try:
            data, fds, msg_flags, _ = socket.recv_fds(
                pending.sock, MAX_REQUEST - len(pending.line), MAX_FDS, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return
        except OSError:
            data, fds, msg_flags = b"", [], 0
        pending.fds.extend(fds)
        if msg_flags & socket.MSG_CTRUNC or len(pending.fds) > MAX_FDS:
            self._reject(fd, "too many file descriptors")
            return
        if not data:
            self._reject(fd, "closed before its request")
            return
        pending.line += data
        if not pending.line.endswith(b"\n"):
            if len(pending.line) >= MAX_REQUEST:
                self._reject(fd, "request too long")
            return
        del self._pending[fd]
        self.reactor.unregister(fd)
        try:
            device = self._admit(pending)
        except DeviceError as err:
            self._answer(pending.sock, f"ERR {err}\n")
            pending.close()
            log.warning("device host of group %s: join refused: %s", self.group, err)
            return
        member = _Member(pending.sock, pending.fds)  # what is left: the fds to keep
        self._members[device] = member
        self.reactor.register(
            pending.sock.fileno(), IN | ERR, functools.partial(self._on_launcher, device)
        )
        self._answer(pending.sock, f"OK {os.getpid()}\n")

    def _admit(self, pending: PendingClient) -> VsockDevice:
        """A device for the VM of a complete request; DeviceError says why not. The listening
        sockets become the device's; the other fds are kept until it leaves."""
        request = parse_request(bytes(pending.line), self.group)
        if isinstance(request, str):
            raise DeviceError(request)
        if len(pending.fds) < 2:
            raise DeviceError("the vhost-user and hybrid sockets did not come with the request")
        if any(d.guest_cid == request.cid for d in self._members):
            raise DeviceError(f"CID {request.cid} is already served here")
        vhost_fd, hybrid_fd = pending.fds[:2]
        pending.fds[:2] = []  # from here each is closed exactly once, here or by its socket
        try:
            vhost = _listener(vhost_fd, "vhost-user")
        except BaseException:
            os.close(hybrid_fd)
            raise
        try:
            hybrid = _listener(hybrid_fd, "hybrid")
        except BaseException:
            vhost.close()
            raise
        try:
            device = VsockDevice(
                vhost_socket=vhost,
                uds_path=request.uds,
                uds_socket=hybrid,
                guest_cid=request.cid,
                buf_alloc=self.buf_alloc,
                max_connections=self.max_connections,
                exit_on_disconnect=True,
                exit_with_pid=request.exit_with_pid,
                groups=request.groups,
                groups_dir=self.groups_dir,
                reactor=self.reactor,
                cohosted=self.cohosted,
            )
        except BaseException:
            vhost.close()
            hybrid.close()
            raise
        self.loop.add(device)
        log.info(
            "device host of group %s: serving guest CID %d (groups %s)",
            self.group,
            request.cid,
            ",".join(request.groups),
        )
        return device

    def _on_launcher(self, device: VsockDevice, mask: int) -> None:
        """The launcher's connection after OK: ``WATCH <qemu pid>`` lines, then EOF. EOF
        before QEMU ever connected, and with no QEMU watched, drops the VM."""
        member = self._members.get(device)
        if member is None:
            return
        try:
            data = member.conn.recv(MAX_REQUEST - len(member.line))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            member.line += data
            while b"\n" in member.line:
                line, _, rest = bytes(member.line).partition(b"\n")
                member.line = bytearray(rest)
                self._on_command(device, member, line)
            if len(member.line) >= MAX_REQUEST:
                member.line.clear()  # no such command: drop it
            return
        self.reactor.unregister(member.conn.fileno())
        if device.sessions == 0 and not member.watched:
            device._stop_for("its launcher left before QEMU connected")

    def _on_command(self, device: VsockDevice, member: _Member, line: bytes) -> None:
        word, _, pid = line.decode(errors="replace").partition(" ")
        if word != "WATCH" or not pid.isdigit() or member.watched:
            log.warning("device host of group %s: ignored %r from a launcher", self.group, line)
            return
        try:
            device.watch_process(int(pid), "its QEMU")
        except DeviceError as err:  # gone already: the VM will not connect
            device._stop_for(str(err))
            return
        member.watched = True

    def _left(self, device: VsockDevice) -> None:
        member = self._members.pop(device, None)
        device.close()
        if member is not None:
            self.reactor.unregister(member.conn.fileno())
            member.conn.close()  # tells the launcher its VM's device is gone
            close_fds(member.held)
        log.info("device host of group %s: guest CID %d left", self.group, device.guest_cid)
        if not self._members:
            self._idle_since = time.monotonic()

    def _reject(self, fd: int, why: str) -> None:
        pending = self._pending.pop(fd)
        self.reactor.unregister(fd)
        pending.close()
        if why:
            log.warning("device host of group %s: join refused: %s", self.group, why)

    @staticmethod
    def _answer(sock: socket.socket, line: str) -> None:
        with contextlib.suppress(OSError):  # a short line into a fresh socket: never blocks
            sock.send(line.encode(errors="replace")[:MAX_REQUEST])


def _listener(fd: int, what: str) -> socket.socket:
    """A received fd as a non-blocking listening Unix stream socket (closed if it is not)."""
    sock = unix_stream_from_fd(fd, f"the {what} fd", listening=True, owned=True)
    sock.setblocking(False)
    return sock
