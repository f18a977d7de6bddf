"""``VsockDevice``: a vhost-user-vsock back-end QEMU's ``vhost-user-vsock-pci`` talks to.

One thread runs everything (:meth:`VsockDevice.serve_forever`): the vhost-user session with QEMU
(:class:`SessionState`), the two virtqueues (rx = vring 0, tx = vring 1; QEMU keeps the event
queue), and the :class:`~vsockrpc.vhost.muxer.Muxer` that maps guest streams to host Unix
sockets. QEMU disconnecting unmaps everything and the device waits for the next front-end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol

from vsockrpc.errors import BadInputError, DeviceError, ProtocolError
from vsockrpc.vhost import protocol as vu
from vsockrpc.vhost.memory import GuestMemory
from vsockrpc.vhost.muxer import Muxer
from vsockrpc.vhost.packet import RESERVED_CIDS
from vsockrpc.vhost.paths import DEFAULT_MODE, BoundPath, close_fds, listen_unix
from vsockrpc.vhost.reactor import ERR, IN, Reactor
from vsockrpc.vhost.session import RX_QUEUE, TX_QUEUE, SessionState, StateError, VhostUserSession
from vsockrpc.vhost.sibling import CoHosted, open_hub
from vsockrpc.vhost.virtqueue import Virtqueue

__all__ = ["DeviceLoop", "SessionState", "StateError", "VsockDevice"]

log = logging.getLogger(__name__)

DEFAULT_BUF_ALLOC = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 1023  # Firecracker's cap
#: Extra passes per loop iteration for events between devices of one process (DeviceLoop).
LINK_ROUNDS = 4


class VsockDevice(VhostUserSession):
    """A vhost-user-vsock back-end with a Firecracker-compatible hybrid Unix socket.

    ``vhost_socket`` is a path to listen on, or an already listening Unix socket (the VM launcher
    binds it before QEMU starts). ``uds_path`` is the hybrid socket host clients connect to
    (``CONNECT <port>\\n``); guest connections to CID 2 port P go to ``<uds_path>_P``;
    ``uds_socket`` is that socket already listening (bound by the caller), else the device binds
    ``uds_path``. Socket files the device binds get ``socket_mode`` and are removed at close only
    if they are still the files it bound.

    ``groups`` (with ``groups_dir``) makes the guest a member of those groups: it can connect to
    the guests of the same groups by CID and they to it (sibling routing, :mod:`~.sibling`);
    without groups the guest reaches the host only.

    Lifetime: ``exit_on_disconnect`` ends :meth:`serve_forever` when the first front-end (QEMU)
    disconnects instead of waiting for the next one; ``exit_with_pid`` ends it when that process
    exits (watched through a pidfd). Either way the device's QEMU going away stops it.
    """

    def __init__(
        self,
        *,
        vhost_socket: str | socket.socket,
        uds_path: str,
        guest_cid: int,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        uds_socket: socket.socket | None = None,
        socket_mode: int = DEFAULT_MODE,
        exit_on_disconnect: bool = False,
        exit_with_pid: int | None = None,
        groups: Sequence[str] = (),
        groups_dir: str | None = None,
        reactor: Reactor | None = None,
        cohosted: CoHosted | None = None,
    ) -> None:
        if guest_cid in RESERVED_CIDS or not 0 < guest_cid < 0xFFFFFFFF:
            raise BadInputError(f"guest CID {guest_cid} is reserved or out of range (use >= 3)")
        if not 0 < buf_alloc <= 0x7FFFFFFF:
            raise BadInputError(f"buf_alloc {buf_alloc} out of range")
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.state = SessionState.WAITING
        # Set by stop() from any thread or a signal handler: a plain bool (one atomic store under
        # the GIL) so a handler interrupting the loop can never block on a lock the loop holds.
        self._stop_requested = False
        self._serving = threading.Event()  # set while serve_forever runs
        self._served = threading.Event()  # set when serve_forever has returned
        self._served.set()
        self._owned_paths: list[BoundPath] = []
        self.exit_on_disconnect = exit_on_disconnect
        self.stop_reason = ""  # why serve_forever returned on its own ("" after stop())
        # pidfds of processes whose exit stops the device → what to log then
        self._pidfds: dict[int, str] = {}
        # A reactor given is shared with other devices of this process (DeviceLoop), and
        # closed by its owner, not here.
        self._owns_reactor = reactor is None
        self.reactor = Reactor() if reactor is None else reactor
        try:
            if exit_with_pid is not None:
                self._pidfds[_open_pidfd(exit_with_pid)] = "the watched process exited"
            if isinstance(vhost_socket, socket.socket):
                self._listener = vhost_socket
                self.vhost_path: str | None = None
            else:
                self._listener, bound = listen_unix(vhost_socket, mode=socket_mode)
                self._owned_paths.append(bound)
                self.vhost_path = vhost_socket
            self._listener.setblocking(False)
            if uds_socket is not None:
                self._uds = uds_socket
            else:
                self._uds, bound = listen_unix(uds_path, mode=socket_mode)
                self._owned_paths.append(bound)
            self._uds.setblocking(False)
        except BaseException:
            self.close()
            raise
        self.memory = GuestMemory()
        self.rings = [Virtqueue(RX_QUEUE, writable=True), Virtqueue(TX_QUEUE, writable=False)]
        self.muxer = Muxer(
            self.reactor, uds_path, guest_cid, buf_alloc=buf_alloc, max_connections=max_connections
        )
        self._conn: socket.socket | None = None
        self._features = 0
        self._protocol_features = 0
        self.sessions = 0  # front-ends served so far (for tests and logs)
        try:
            self.muxer.siblings = open_hub(
                self.reactor,
                groups_dir,
                groups,
                guest_cid,
                self.muxer.on_sibling,
                cohosted=cohosted,
            )
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> VsockDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.close()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (thread-safe, idempotent)."""
        self._stop_requested = True
        self.reactor.wake()

    def _stop_for(self, reason: str) -> None:
        if not self._stop_requested:
            log.info("stopping: %s", reason)
            self.stop_reason = reason
        self.stop()

    def close(self) -> None:
        """Release sockets, mappings and fds; remove the socket files we created. Waits for a
        running :meth:`serve_forever` (in another thread) to return first."""
        if self._serving.is_set():
            self.stop()
            self._served.wait(10.0)
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener.close()
        uds = getattr(self, "_uds", None)
        if uds is not None:
            uds.close()
        if hasattr(self, "muxer"):
            self._disconnect()
            self.muxer.close()
        for bound in self._owned_paths:
            with contextlib.suppress(OSError):
                if not bound.unlink():
                    log.info("not removing %s: no longer the socket this device bound", bound.path)
        self._owned_paths = []
        close_fds(getattr(self, "_pidfds", {}))
        self._pidfds = {}
        if hasattr(self, "reactor") and self._owns_reactor:
            with contextlib.suppress(OSError):
                self.reactor.close()

    def serve_forever(self) -> None:
        """Serve front-ends one after another until :meth:`stop`."""
        loop = DeviceLoop(self.reactor)
        loop.add(self)
        loop.run()

    # One iteration of the loop, in parts, so that one thread can serve several devices on one
    # reactor (DeviceLoop): begin, then (timeout, poll, after_poll) until stopped, then end.
    def _begin(self) -> None:
        reactor = self.reactor
        self._served.clear()
        self._serving.set()
        reactor.register(self._listener.fileno(), IN, lambda _m: self._accept())
        reactor.register(self._uds.fileno(), IN, lambda _m: self.muxer.on_listener(self._uds))
        for fd, gone in self._pidfds.items():
            self._watch_pidfd(fd, gone)
        if self.muxer.siblings is not None:
            self.muxer.siblings.start()

    def watch_process(self, pid: int, what: str) -> None:
        """Stop when process ``pid`` exits too (its QEMU, named after the device was made and
        started: a group host learns it from the launcher); from the loop's thread."""
        fd = _open_pidfd(pid)
        self._pidfds[fd] = gone = f"{what} (pid {pid}) exited"
        self._watch_pidfd(fd, gone)

    def _watch_pidfd(self, fd: int, gone: str) -> None:
        self.reactor.register(fd, IN, lambda _m: self._stop_for(gone))

    def _timeout(self, now: float) -> float:
        """How long the loop may sleep for this device: 0 with work to do, -1 for ever."""
        muxer = self.muxer
        if muxer.has_work():
            return 0.0
        deadline = muxer.next_deadline() if muxer.has_timers() else None
        timeout = -1.0 if deadline is None else max(0.0, deadline - now)
        tx_due = muxer.tx_signal_due(now)
        if tx_due is not None and (timeout < 0 or tx_due < timeout):
            timeout = tx_due
        return timeout

    def _after_poll(self, now: float) -> None:
        """The device's pass (if it has work), then its deferred tx signal and timers, as of
        ``now`` (read once per loop iteration)."""
        muxer = self.muxer
        if muxer.pass_due():
            muxer.run_pass()
        tx = muxer.tx
        if tx is not None and tx.signal_pending and muxer.tx_signal_due(now) == 0:
            tx.notify()
        if muxer.has_timers():
            muxer.expire(now)

    def _end(self) -> None:
        reactor = self.reactor
        self.state = SessionState.STOPPING
        reactor.unregister(self._listener.fileno())
        reactor.unregister(self._uds.fileno())
        for fd in self._pidfds:
            reactor.unregister(fd)
        if self.muxer.siblings is not None:
            self.muxer.siblings.stop()
        self._disconnect()
        self._serving.clear()
        self._served.set()

    # ------------------------------------------------------------------ front-end socket
    def _accept(self) -> None:
        if self._conn is not None:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        conn.settimeout(5.0)  # a message body must follow its header promptly
        self._conn = conn
        self.sessions += 1
        self.state = SessionState.CONNECTED
        # One front-end at a time: stop accepting until this one leaves.
        self.reactor.unregister(self._listener.fileno())
        self.reactor.register(conn.fileno(), IN | ERR, lambda _m: self._on_frontend())
        log.info("vhost-user front-end connected")

    def _disconnect(self) -> None:
        """Front-end gone: drop connections, stop rings, unmap memory, accept again."""
        if self._conn is not None:
            self.reactor.unregister(self._conn.fileno())
            self._conn.close()
            self._conn = None
            if self.exit_on_disconnect:
                self._stop_for("the vhost-user front-end disconnected")
            if not self._stop_requested:
                self.reactor.register(self._listener.fileno(), IN, lambda _m: self._accept())
            m = self.muxer
            log.info(
                "vhost-user front-end disconnected (passes %d, packets to guest %d (%d cut "
                "through from another guest) in %d rx signals, from guest %d, credit requests %d)",
                m.stats_passes,
                m.stats_packets_rx,
                m.stats_packets_direct,
                m.stats_rx_signals,
                m.stats_packets_tx,
                m.stats_credit_requests,
            )
        self._stop_data_path()
        for ring in self.rings:
            ring.last_avail_idx = 0
            ring.num = 0
        self.memory.clear()
        self._features = self._protocol_features = 0
        if self.state is not SessionState.STOPPING:
            self.state = SessionState.WAITING

    def _on_frontend(self) -> None:
        # Handle every message already queued, then return to the loop.
        conn = self._conn
        while conn is not None and self._conn is conn:
            try:
                msg = vu.recv_message(conn)
            except (EOFError, OSError, ProtocolError) as err:
                if not isinstance(err, EOFError):
                    log.warning("vhost-user session ended: %s", str(err))
                self._disconnect()
                return
            try:
                self._dispatch(msg)
            except ProtocolError as err:
                log.warning("bad vhost-user request %s: %s", msg.request, str(err))
                if msg.need_reply and self._conn is not None:
                    self._reply(msg.request, vu.U64.pack(1))
            except OSError as err:
                log.warning("vhost-user session failed: %s", str(err))
                self._disconnect()
                return
            finally:
                msg.close_fds()
            # More queued? (A MSG_PEEK recv would wait out the socket timeout; poll does not.)
            poller = select.poll()
            poller.register(conn, select.POLLIN)
            if not poller.poll(0):
                return


def _open_pidfd(pid: int) -> int:
    """A pidfd for ``pid`` (Linux >= 5.3): readable once the process has exited."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise DeviceError(f"process {pid} to exit with is not running") from None
    except OSError as err:
        raise DeviceError(f"cannot watch process {pid}: {err.strerror or err}") from err


class LoopHooks(Protocol):
    """What a :class:`DeviceLoop` runs besides its devices (the group host's own timers)."""

    def next_deadline(self) -> float | None: ...

    def expire(self, now: float) -> None: ...

    def finished(self) -> bool:
        """True when the loop may end (asked whenever no device is left)."""
        ...


class DeviceLoop:
    """Serves devices that share one reactor, in one thread, until none is left.

    Every iteration gives each device with work one pass (bounded work: at most a tx ring's
    worth and an rx ring's worth), so a guest that floods its device delays the others by at
    most one pass each turn. A device that stops (its QEMU gone with ``exit_on_disconnect``, its
    watched process gone, :meth:`VsockDevice.stop`) leaves the loop and ``on_leave`` is called
    with it; the others go on. Devices may be added while the loop runs (from its own thread)."""

    def __init__(
        self,
        reactor: Reactor,
        *,
        on_leave: Callable[[VsockDevice], None] | None = None,
        hooks: LoopHooks | None = None,
    ) -> None:
        self.reactor = reactor
        self.devices: list[VsockDevice] = []
        self.on_leave = on_leave
        self.hooks = hooks
        self._stopping = False

    def add(self, device: VsockDevice) -> None:
        if device.reactor is not self.reactor:
            raise ValueError("devices served together must share one reactor")
        device._begin()
        self.devices.append(device)
        if self._stopping:  # stopped before this device came: it leaves at once
            device.stop()

    def stop(self) -> None:
        """Stop every device, and any added later (thread- and signal-safe: flags and one
        eventfd write each)."""
        self._stopping = True
        for device in list(self.devices):
            device.stop()
        self.reactor.wake()

    def run(self) -> None:
        reactor, devices, hooks = self.reactor, self.devices, self.hooks
        monotonic = time.monotonic
        try:
            while True:
                for device in [d for d in devices if d._stop_requested]:
                    self._leave(device)
                if not devices and (hooks is None or hooks.finished()):
                    break
                now = monotonic()
                timeout = -1.0
                for device in devices:
                    wait = device._timeout(now)
                    if wait >= 0 and (timeout < 0 or wait < timeout):
                        timeout = wait
                if hooks is not None:
                    deadline = hooks.next_deadline()
                    if deadline is not None and (timeout < 0 or deadline - now < timeout):
                        timeout = max(0.0, deadline - now)
                reactor.poll(timeout)
                now = monotonic()
                for device in devices:
                    if not device._stop_requested:
                        device._after_poll(now)
                # A pass that moved bytes over an in-process link posted an event for the
                # other guest's device, or cut them through and queued that guest's rx signal
                # (call_soon): deliver it now rather than after another epoll_wait (a round
                # trip between two guests of this process then costs one wake-up per
                # direction). Bounded, so real fds are polled again soon under load. (Timers
                # and deferred tx signals wait for the next iteration.)
                for _ in range(LINK_ROUNDS):
                    if not reactor.has_posted:
                        break
                    reactor.deliver_posted()
                    for device in devices:
                        muxer = device.muxer
                        if not device._stop_requested and muxer.pass_due():
                            muxer.run_pass()
                if hooks is not None:
                    hooks.expire(now)
        finally:
            for device in list(devices):
                self._leave(device)

    def _leave(self, device: VsockDevice) -> None:
        self.devices.remove(device)
        device._end()
        if self.on_leave is not None:
            self.on_leave(device)
