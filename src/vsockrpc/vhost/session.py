"""The vhost-user session with QEMU (vhost-user.rst "Communication"): its state
(:class:`SessionState`) and one handler per front-end request, each declaring the session
states it needs (``@handles(Request.X, requires=...)``, after qemu.qmp's ``@require``); a
request in any other state raises :class:`StateError` (a :class:`ProtocolError`: the front-end
gets a failed REPLY_ACK if it asked for one, the session goes on).

The handlers own the two virtqueues (rx = vring 0, tx = vring 1; QEMU keeps the event queue)
and the guest memory; :class:`~vsockrpc.vhost.device.VsockDevice` adds the sockets and the loop.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar, cast

from vsockrpc.errors import ProtocolError
from vsockrpc.vhost import protocol as vu
from vsockrpc.vhost.memory import GuestMemory
from vsockrpc.vhost.muxer import Muxer
from vsockrpc.vhost.protocol import Message, Request
from vsockrpc.vhost.reactor import ET, IN, Reactor
from vsockrpc.vhost.virtqueue import RingError, RingState, Virtqueue

__all__ = ["ANY_SESSION", "OWNED_SESSION", "SessionState", "StateError", "VhostUserSession"]

log = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
NUM_QUEUES = 2  # vhost-user-vsock: QEMU hands the back-end only rx and tx
_F = TypeVar("_F", bound=Callable[..., Any])


class SessionState(enum.Enum):
    """The vhost-user session (vhost-user.rst "Communication"; order seen in GUEST-BOOT.md)."""

    WAITING = "waiting"  # no front-end connected
    CONNECTED = "connected"  # front-end connected, not yet SET_OWNER
    OWNED = "owned"  # SET_OWNER received
    CONFIGURED = "configured"  # SET_FEATURES + SET_MEM_TABLE received
    RUNNING = "running"  # both rings started and enabled
    STOPPING = "stopping"  # stop() called


#: States in which a front-end is connected; requests allowed before SET_OWNER need only this.
ANY_SESSION = frozenset(
    {SessionState.CONNECTED, SessionState.OWNED, SessionState.CONFIGURED, SessionState.RUNNING}
)
#: vhost-user.rst "Communication": anything touching memory or rings needs SET_OWNER first.
OWNED_SESSION = ANY_SESSION - {SessionState.CONNECTED}


class StateError(ProtocolError):
    """A vhost-user request arrived in a session state its handler does not allow."""

    def __init__(self, request: int, state: SessionState, allowed: frozenset[SessionState]) -> None:
        name = Request(request).name if request in Request._value2member_map_ else str(request)
        wanted = ", ".join(sorted(s.value for s in allowed))
        super().__init__(f"vhost-user {name} in session state {state.value} (needs {wanted})")
        self.request = request
        self.state = state


_Handler = Callable[["VhostUserSession", Message], "bytes | None"]
#: request → (handler, session states it requires); filled by :func:`handles`.
_HANDLERS: dict[int, tuple[_Handler, frozenset[SessionState]]] = {}


def handles(
    request: Request, *, requires: frozenset[SessionState] = OWNED_SESSION
) -> Callable[[_F], _F]:
    """Register the decorated method as the handler of ``request``, allowed in ``requires``
    (the front-end must own the session unless said otherwise). A handler returns the reply
    payload, or None (then a REPLY_ACK is sent if the front-end asked for one)."""

    def register(fn: _F) -> _F:
        if request in _HANDLERS:
            raise AssertionError(f"two handlers for {request.name}")
        _HANDLERS[request] = (cast(_Handler, fn), requires)
        return fn

    return register


class VhostUserSession:
    """The request handlers of one device; state shared with the loop that owns it."""

    state: SessionState
    guest_cid: int
    reactor: Reactor
    memory: GuestMemory
    rings: list[Virtqueue]
    muxer: Muxer
    _conn: socket.socket | None
    _features: int
    _protocol_features: int

    def _reply(self, request: int, payload: bytes) -> None:
        assert self._conn is not None
        vu.send_reply(self._conn, request, payload)

    # ------------------------------------------------------------------ requests
    def _dispatch(self, msg: Message) -> None:
        """Run the request's handler if the session is in a state it allows (its
        :func:`requires` declaration, as qemu.qmp's ``@require(Runstate.X)``), send its reply,
        or the REPLY_ACK the front-end asked for."""
        req = msg.request
        entry = _HANDLERS.get(req)
        if entry is None:
            raise ProtocolError(f"unsupported vhost-user request {req}")
        handler, states = entry
        if self.state not in states:
            raise StateError(req, self.state, states)
        reply = handler(self, msg)
        if reply is not None:
            self._reply(req, reply)
        elif msg.need_reply and self._protocol_features & vu.PF_REPLY_ACK:
            # vhost-user.rst "REPLY_ACK": NEED_REPLY and no other reply → u64 0 for success.
            self._reply(req, vu.U64.pack(0))

    @handles(Request.GET_FEATURES, requires=ANY_SESSION)
    def _get_features(self, msg: Message) -> bytes:
        return vu.U64.pack(vu.DEVICE_FEATURES)

    @handles(Request.SET_FEATURES)
    def _set_features(self, msg: Message) -> None:
        # Bits we never offered are ignored (AND with our offer).
        self._features = vu.parse_u64(msg.payload) & vu.DEVICE_FEATURES
        self._advance(SessionState.CONFIGURED if self.memory.regions else None)

    @handles(Request.GET_PROTOCOL_FEATURES, requires=ANY_SESSION)
    def _get_protocol_features(self, msg: Message) -> bytes:
        return vu.U64.pack(vu.PROTOCOL_FEATURES)

    @handles(Request.SET_PROTOCOL_FEATURES, requires=ANY_SESSION)
    def _set_protocol_features(self, msg: Message) -> None:
        self._protocol_features = vu.parse_u64(msg.payload) & vu.PROTOCOL_FEATURES

    @handles(Request.GET_QUEUE_NUM, requires=ANY_SESSION)
    def _get_queue_num(self, msg: Message) -> bytes:
        return vu.U64.pack(NUM_QUEUES)

    @handles(Request.SET_OWNER, requires=ANY_SESSION)
    def _set_owner(self, msg: Message) -> None:
        if self.state is SessionState.CONNECTED:
            self.state = SessionState.OWNED

    @handles(Request.RESET_OWNER)
    def _reset_owner(self, msg: Message) -> None:
        self._stop_data_path()
        self.state = SessionState.CONNECTED

    @handles(Request.SET_VRING_NUM)
    def _set_vring_num(self, msg: Message) -> None:
        index, num = self._vring_state(msg.payload)
        self.rings[index].set_num(num)

    @handles(Request.SET_VRING_ADDR)
    def _set_vring_addr(self, msg: Message) -> None:
        index, desc, used, avail = vu.parse_vring_addr(msg.payload, NUM_QUEUES)
        ring = self.rings[index]
        ring.desc_addr, ring.used_addr, ring.avail_addr = desc, used, avail
        if ring.state in (RingState.STARTED, RingState.ENABLED):
            ring.map(self.memory)

    @handles(Request.SET_VRING_BASE)
    def _set_vring_base(self, msg: Message) -> None:
        index, base = self._vring_state(msg.payload)
        if base > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE {base} out of range")
        self.rings[index].last_avail_idx = base

    @handles(Request.GET_VRING_BASE)
    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = self._vring_state(msg.payload)
        ring = self.rings[index]
        # Stopping a ring ends the data path: every connection is dropped (guest reset).
        self.muxer.reset()
        if ring.kick_fd is not None:
            self.reactor.unregister(ring.kick_fd)
            ring.set_fd("kick_fd", None)
        base = ring.stop()
        ring.enabled = False
        self._update_running()
        return vu.VRING_STATE.pack(index, base)

    @handles(Request.SET_VRING_ENABLE)
    def _set_vring_enable(self, msg: Message) -> None:
        index, enable = self._vring_state(msg.payload)
        ring = self.rings[index]
        ring.enabled = bool(enable)
        if ring.state is RingState.STARTED and ring.enabled:
            ring.state = RingState.ENABLED
        elif ring.state is RingState.ENABLED and not ring.enabled:
            ring.state = RingState.STARTED
            self.muxer.reset()
        self._update_running()

    @handles(Request.SET_CONFIG)
    @handles(Request.SET_VRING_ENDIAN)
    def _ignored(self, msg: Message) -> None:
        """SET_CONFIG: the vsock config space (guest_cid) is read-only for the driver."""

    def _advance(self, state: SessionState | None) -> None:
        if state is not None and self.state in (SessionState.OWNED, SessionState.CONNECTED):
            self.state = state

    def _ring(self, index: int) -> Virtqueue:
        vu.check_vring_index(index, NUM_QUEUES)
        return self.rings[index]

    def _vring_state(self, payload: bytes) -> tuple[int, int]:
        return vu.parse_vring_state(payload, NUM_QUEUES)

    @handles(Request.SET_MEM_TABLE)
    def _set_mem_table(self, msg: Message) -> None:
        regions = vu.parse_mem_table(msg.payload, len(msg.fds))
        # Remap: connections and rings keep working after re-translation (QEMU may resend).
        self.muxer.release_held_rx()
        for ring in self.rings:
            ring.unmap()
        self.memory.clear()
        for fd, r in zip(msg.fds, regions, strict=True):
            self.memory.add_region(
                fd, r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
            )
        for ring in self.rings:
            if ring.state in (RingState.STARTED, RingState.ENABLED):
                try:
                    ring.map(self.memory)
                except RingError:
                    ring.break_ring()
        self._advance(SessionState.CONFIGURED if self._features else None)
        self._update_running()

    @handles(Request.SET_VRING_KICK)
    @handles(Request.SET_VRING_CALL, requires=ANY_SESSION)
    @handles(Request.SET_VRING_ERR, requires=ANY_SESSION)
    def _set_vring_fd(self, msg: Message) -> None:
        value = vu.parse_u64(msg.payload)
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
                log.warning("guest corrupted a virtqueue: %s", str(err))  # text, as in the muxer
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

    @handles(Request.GET_CONFIG, requires=ANY_SESSION)
    def _get_config(self, msg: Message) -> bytes:
        payload = msg.payload
        if len(payload) < vu.CONFIG_HEAD.size:
            raise ProtocolError("GET_CONFIG too short")
        offset, size, flags = vu.CONFIG_HEAD.unpack_from(payload)
        if size > 256:
            raise ProtocolError(f"GET_CONFIG size {size} too large")
        # 5.10.4: the vsock config space is one le64 guest_cid.
        space = self.guest_cid.to_bytes(8, "little")
        data = space[offset : offset + size] if offset < len(space) else b""
        data = data.ljust(size, b"\0")
        return vu.CONFIG_HEAD.pack(offset, size, flags) + data
