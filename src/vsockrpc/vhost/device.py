"""``VsockDevice``: a vhost-user-vsock back-end QEMU's ``vhost-user-vsock-pci`` talks to.

One thread runs everything (:meth:`VsockDevice.serve_forever`): the vhost-user session with QEMU
(:class:`SessionState`), the two virtqueues (rx = vring 0, tx = vring 1; QEMU keeps the event
queue), and the :class:`~vsockrpc.vhost.muxer.Muxer` that maps guest streams to host Unix
sockets. QEMU disconnecting unmaps everything and the device waits for the next front-end.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import select
import socket
import threading
import time
from types import TracebackType

from vsockrpc.errors import DeviceError, ProtocolError
from vsockrpc.vhost import protocol as vu
from vsockrpc.vhost.memory import GuestMemory
from vsockrpc.vhost.muxer import Muxer
from vsockrpc.vhost.packet import RESERVED_CIDS
from vsockrpc.vhost.protocol import Message, Request
from vsockrpc.vhost.reactor import ERR, ET, IN, Reactor
from vsockrpc.vhost.virtqueue import RingError, RingState, Virtqueue

__all__ = ["SessionState", "VsockDevice"]

log = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
NUM_QUEUES = 2  # vhost-user-vsock: QEMU hands the back-end only rx and tx
DEFAULT_BUF_ALLOC = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 1023  # Firecracker's cap


class SessionState(enum.Enum):
    """The vhost-user session (vhost-user.rst "Communication"; order seen in GUEST-BOOT.md)."""

    WAITING = "waiting"  # no front-end connected
    CONNECTED = "connected"  # front-end connected, not yet SET_OWNER
    OWNED = "owned"  # SET_OWNER received
    CONFIGURED = "configured"  # SET_FEATURES + SET_MEM_TABLE received
    RUNNING = "running"  # both rings started and enabled
    STOPPING = "stopping"  # stop() called


class VsockDevice:
    """A vhost-user-vsock back-end with a Firecracker-compatible hybrid Unix socket.

    ``vhost_socket`` is a path to listen on, or an already listening Unix socket (the VM launcher
    binds it before QEMU starts). ``uds_path`` is the hybrid socket host clients connect to
    (``CONNECT <port>\\n``); guest connections to CID 2 port P go to ``<uds_path>_P``.
    """

    def __init__(
        self,
        *,
        vhost_socket: str | socket.socket,
        uds_path: str,
        guest_cid: int,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if guest_cid in RESERVED_CIDS or not 0 < guest_cid < 0xFFFFFFFF:
            raise DeviceError(f"guest CID {guest_cid} is reserved or out of range (use >= 3)")
        if not 0 < buf_alloc <= 0x7FFFFFFF:
            raise DeviceError(f"buf_alloc {buf_alloc} out of range")
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.state = SessionState.WAITING
        # Set by stop() from any thread or a signal handler: a plain bool (one atomic store under
        # the GIL) so a handler interrupting the loop can never block on a lock the loop holds.
        self._stop_requested = False
        self._serving = threading.Event()  # set while serve_forever runs
        self._served = threading.Event()  # set when serve_forever has returned
        self._served.set()
        self._owned_paths: list[str] = []
        self.reactor = Reactor()
        try:
            if isinstance(vhost_socket, socket.socket):
                self._listener = vhost_socket
                self.vhost_path: str | None = None
            else:
                self._listener = _listen_unix(vhost_socket)
                self._owned_paths.append(vhost_socket)
                self.vhost_path = vhost_socket
            self._listener.setblocking(False)
            self._uds = _listen_unix(uds_path)
            self._owned_paths.append(uds_path)
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
        for path in self._owned_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._owned_paths = []
        if hasattr(self, "reactor"):
            with contextlib.suppress(OSError):
                self.reactor.close()

    def serve_forever(self) -> None:
        """Serve front-ends one after another until :meth:`stop`."""
        reactor = self.reactor
        self._served.clear()
        self._serving.set()
        reactor.register(self._listener.fileno(), IN, lambda _m: self._accept())
        reactor.register(self._uds.fileno(), IN, lambda _m: self.muxer.on_listener(self._uds))
        muxer = self.muxer
        try:
            monotonic = time.monotonic
            while not self._stop_requested:
                if muxer.has_work():
                    timeout = 0.0
                else:
                    now = monotonic()
                    deadline = muxer.next_deadline() if muxer.has_timers() else None
                    timeout = -1.0 if deadline is None else max(0.0, deadline - now)
                    tx_due = muxer.tx_signal_due(now)
                    if tx_due is not None and (timeout < 0 or tx_due < timeout):
                        timeout = tx_due
                reactor.poll(timeout)
                if self._stop_requested:
                    break
                muxer.run_pass()
                tx = muxer.tx
                if tx is not None and tx.signal_pending and muxer.tx_signal_due(monotonic()) == 0:
                    tx.notify()
                if muxer.has_timers():
                    muxer.expire(monotonic())
        finally:
            self.state = SessionState.STOPPING
            reactor.unregister(self._listener.fileno())
            reactor.unregister(self._uds.fileno())
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
            if not self._stop_requested:
                self.reactor.register(self._listener.fileno(), IN, lambda _m: self._accept())
            m = self.muxer
            log.info(
                "vhost-user front-end disconnected (passes %d, packets to guest %d in %d rx "
                "signals, from guest %d, credit requests %d)",
                m.stats_passes,
                m.stats_packets_rx,
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
                    log.warning("vhost-user session ended: %s", err)
                self._disconnect()
                return
            try:
                self._dispatch(msg)
            except ProtocolError as err:
                log.warning("bad vhost-user request %s: %s", msg.request, err)
                if msg.need_reply and self._conn is not None:
                    self._reply(msg.request, vu.U64.pack(1))
            except OSError as err:
                log.warning("vhost-user session failed: %s", err)
                self._disconnect()
                return
            finally:
                msg.close_fds()
            # More queued? (A MSG_PEEK recv would wait out the socket timeout; poll does not.)
            poller = select.poll()
            poller.register(conn, select.POLLIN)
            if not poller.poll(0):
                return

    def _reply(self, request: int, payload: bytes) -> None:
        assert self._conn is not None
        vu.send_reply(self._conn, request, payload)

    # ------------------------------------------------------------------ requests
    def _dispatch(self, msg: Message) -> None:
        req = msg.request
        payload = msg.payload
        replied = False
        # Guard (vhost-user.rst "Communication"): only queries and SET_OWNER may come before
        # the front-end took ownership; anything touching memory or rings needs it.
        if self.state is SessionState.CONNECTED and req not in _BEFORE_OWNER:
            raise ProtocolError(f"vhost-user request {req} before SET_OWNER")
        if req == Request.GET_FEATURES:
            self._reply(req, vu.U64.pack(vu.DEVICE_FEATURES))
            replied = True
        elif req == Request.SET_FEATURES:
            # Bits we never offered are ignored (AND with our offer).
            self._features = _u64(payload) & vu.DEVICE_FEATURES
            self._advance(SessionState.CONFIGURED if self.memory.regions else None)
        elif req == Request.GET_PROTOCOL_FEATURES:
            self._reply(req, vu.U64.pack(vu.PROTOCOL_FEATURES))
            replied = True
        elif req == Request.SET_PROTOCOL_FEATURES:
            self._protocol_features = _u64(payload) & vu.PROTOCOL_FEATURES
        elif req == Request.GET_QUEUE_NUM:
            self._reply(req, vu.U64.pack(NUM_QUEUES))
            replied = True
        elif req == Request.SET_OWNER:
            if self.state is SessionState.CONNECTED:
                self.state = SessionState.OWNED
        elif req == Request.RESET_OWNER:
            self._stop_data_path()
            self.state = SessionState.CONNECTED
        elif req == Request.SET_MEM_TABLE:
            self._set_mem_table(msg)
        elif req == Request.SET_VRING_NUM:
            index, num = self._vring_state(payload)
            self.rings[index].set_num(num)
        elif req == Request.SET_VRING_ADDR:
            if len(payload) != vu.VRING_ADDR.size:
                raise ProtocolError("SET_VRING_ADDR: bad size")
            index, _flags, desc, used, avail, _log = vu.VRING_ADDR.unpack(payload)
            ring = self._ring(index)
            ring.desc_addr, ring.used_addr, ring.avail_addr = desc, used, avail
            if ring.state in (RingState.STARTED, RingState.ENABLED):
                ring.map(self.memory)
        elif req == Request.SET_VRING_BASE:
            index, base = self._vring_state(payload)
            if base > 0xFFFF:
                raise ProtocolError(f"SET_VRING_BASE {base} out of range")
            self.rings[index].last_avail_idx = base
        elif req == Request.GET_VRING_BASE:
            index, _ = self._vring_state(payload)
            ring = self.rings[index]
            # Stopping a ring ends the data path: every connection is dropped (guest reset).
            self.muxer.reset()
            if ring.kick_fd is not None:
                self.reactor.unregister(ring.kick_fd)
                ring.set_fd("kick_fd", None)
            base = ring.stop()
            ring.enabled = False
            self._reply(req, vu.VRING_STATE.pack(index, base))
            replied = True
            self._update_running()
        elif req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            self._set_vring_fd(msg)
        elif req == Request.SET_VRING_ENABLE:
            index, enable = self._vring_state(payload)
            ring = self.rings[index]
            ring.enabled = bool(enable)
            if ring.state is RingState.STARTED and ring.enabled:
                ring.state = RingState.ENABLED
            elif ring.state is RingState.ENABLED and not ring.enabled:
                ring.state = RingState.STARTED
                self.muxer.reset()
            self._update_running()
        elif req == Request.GET_CONFIG:
            self._get_config(payload)
            replied = True
        elif req == Request.SET_CONFIG:
            pass  # the vsock config space (guest_cid) is read-only for the driver
        elif req == Request.SET_VRING_ENDIAN:
            pass
        else:
            raise ProtocolError(f"unsupported vhost-user request {req}")
        # vhost-user.rst "REPLY_ACK": NEED_REPLY and no other reply → u64 0 for success.
        if msg.need_reply and not replied and self._protocol_features & vu.PF_REPLY_ACK:
            self._reply(req, vu.U64.pack(0))

    def _advance(self, state: SessionState | None) -> None:
        if state is not None and self.state in (SessionState.OWNED, SessionState.CONNECTED):
            self.state = state

    def _ring(self, index: int) -> Virtqueue:
        if not 0 <= index < NUM_QUEUES:
            raise ProtocolError(f"vring index {index} out of range")
        return self.rings[index]

    def _vring_state(self, payload: bytes) -> tuple[int, int]:
        if len(payload) != vu.VRING_STATE.size:
            raise ProtocolError("vring state message has the wrong size")
        index, num = vu.VRING_STATE.unpack(payload)
        self._ring(index)
        return index, num

    def _set_mem_table(self, msg: Message) -> None:
        payload = msg.payload
        if len(payload) < vu.MEM_TABLE_HEAD.size:
            raise ProtocolError("SET_MEM_TABLE too short")
        (count, _pad) = vu.MEM_TABLE_HEAD.unpack_from(payload)
        if count > 8 or len(payload) < vu.MEM_TABLE_HEAD.size + count * vu.MEM_REGION.size:
            raise ProtocolError(f"SET_MEM_TABLE: bad region count {count}")
        if len(msg.fds) != count:
            raise ProtocolError(f"SET_MEM_TABLE: {count} regions but {len(msg.fds)} fds")
        # Remap: connections and rings keep working after re-translation (QEMU may resend).
        self.muxer.release_held_rx()
        for ring in self.rings:
            ring.unmap()
        self.memory.clear()
        for i in range(count):
            gpa, size, uaddr, offset = vu.MEM_REGION.unpack_from(
                payload, vu.MEM_TABLE_HEAD.size + i * vu.MEM_REGION.size
            )
            self.memory.add_region(msg.fds[i], gpa, size, uaddr, offset)
        for ring in self.rings:
            if ring.state in (RingState.STARTED, RingState.ENABLED):
                try:
                    ring.map(self.memory)
                except RingError:
                    ring.break_ring()
        self._advance(SessionState.CONFIGURED if self._features else None)
        self._update_running()

    def _set_vring_fd(self, msg: Message) -> None:
        value = _u64(msg.payload)
        ring = self._ring(value & vu.VRING_IDX_MASK)
        fd = None if value & vu.VRING_NOFD_MASK else msg.take_fd()
        if fd is None and not value & vu.VRING_NOFD_MASK:
            raise ProtocolError("vring fd message without an fd")
        if msg.request == Request.SET_VRING_CALL:
            ring.set_fd("call_fd", fd)
        elif msg.request == Request.SET_VRING_ERR:
            ring.set_fd("err_fd", fd)
        else:
            if ring.kick_fd is not None:
                self.reactor.unregister(ring.kick_fd)
            ring.set_fd("kick_fd", fd)
            # vhost-user.rst "Starting and stopping rings": a ring starts at SET_VRING_KICK.
            try:
                ring.start(self.memory)
            except RingError as err:
                log.warning("%s", err)
                ring.break_ring()
            if fd is not None:
                os.set_blocking(fd, False)
                # Edge-triggered: every eventfd write is a new edge, so the counter never needs
                # draining (one syscall less per kick); epoll consumes the edge before we scan
                # avail.idx, and a later kick makes a new one.
                self.reactor.register(fd, IN | ET, functools.partial(self._on_kick_event, ring))
            self._update_running()

    def _on_kick_event(self, ring: Virtqueue, mask: int) -> None:
        self._on_kick(ring)

    def _on_kick(self, ring: Virtqueue) -> None:
        if ring.index == TX_QUEUE:
            self.muxer.tx_kicked = True
        else:
            self.muxer.rx_kicked = True

    def _update_running(self) -> None:
        rx, tx = self.rings
        if rx.ready and tx.ready:
            if self.muxer.rx is None:
                self.muxer.attach(rx, tx)
            self.state = SessionState.RUNNING
        else:
            if self.muxer.rx is not None:
                self.muxer.reset()
                self.muxer.rx = self.muxer.tx = None
            if self.state is SessionState.RUNNING:
                self.state = SessionState.CONFIGURED

    def _stop_data_path(self) -> None:
        self.muxer.reset()
        self.muxer.rx = self.muxer.tx = None
        for ring in self.rings:
            if ring.kick_fd is not None:
                self.reactor.unregister(ring.kick_fd)
            ring.stop()
            ring.close_fds()
            ring.enabled = False

    def _get_config(self, payload: bytes) -> None:
        if len(payload) < vu.CONFIG_HEAD.size:
            raise ProtocolError("GET_CONFIG too short")
        offset, size, flags = vu.CONFIG_HEAD.unpack_from(payload)
        if size > 256:
            raise ProtocolError(f"GET_CONFIG size {size} too large")
        # 5.10.4: the vsock config space is one le64 guest_cid.
        space = self.guest_cid.to_bytes(8, "little")
        data = space[offset : offset + size] if offset < len(space) else b""
        data = data.ljust(size, b"\0")
        self._reply(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(offset, size, flags) + data)


_BEFORE_OWNER = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.SET_OWNER,
        Request.GET_CONFIG,
        Request.SET_VRING_CALL,
        Request.SET_VRING_ERR,
    }
)


def _u64(payload: bytes) -> int:
    if len(payload) != 8:
        raise ProtocolError(f"expected a u64 payload, got {len(payload)} bytes")
    value: int = vu.U64.unpack(payload)[0]
    return value


def _listen_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            if os.path.exists(path) and not os.path.isdir(path):
                import stat

                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket from an earlier run
            sock.bind(path)
        except OSError as err:
            raise DeviceError(f"cannot listen on {path}: {err}") from err
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock
