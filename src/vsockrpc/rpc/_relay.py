"""A byte relay between sockets grpcio cannot open (vsock, hybrid vsock) and a private Unix socket.

PyPI grpcio is built without vsock, and no grpcio build speaks the hybrid ``CONNECT`` handshake,
so :func:`vsockrpc.rpc.channel` and :func:`vsockrpc.rpc.serve` put grpcio on a Unix socket in a
private directory and relay bytes to the real transport. grpcio exposes no hook to hand it an
already-connected fd from Python, which is why this is hand-rolled.

A device that can take the accepted socket itself (our hybrid device: the ``Dial`` returns
:class:`Passed`) leaves nothing to relay: the bytes flow between grpcio (or a forwarded client)
and the device directly, and the relay only holds the lifeline (:class:`PassedLink`).

Each relayed connection is a :class:`Link`: two sockets and one pump thread per direction.
A pump moves bytes with ``splice(2)`` through a pipe, so they never enter Python (falling back to
``recv_into`` a preallocated buffer + ``sendall`` where the kernel can't splice a socket family).
Blocking calls release the GIL and the kernel wakes exactly the thread that has work, which
measured faster than a shared selector loop for gRPC's small request/response frames, and
splice beat the copying pump on throughput (both side by side in bench/bench_relay.py).
EOF on one side half-closes the other (``shutdown(SHUT_WR)``), so each direction ends on its own;
an error (reset) shuts both sockets down completely, which wakes the other pump. The sockets are
closed only when both pumps have returned, so an fd is never reused while a thread still uses it.

A server-side relay given :class:`~vsockrpc.rpc._limits.ConnectionLimits` admits connections
through a :class:`~vsockrpc.rpc._limits.Gate`: a new connection waits in the accept loop's
selector (one fd, no thread) until its first byte, and is closed when it stays silent, or
evicted when a peer or the whole relay is at its cap (see :mod:`vsockrpc.rpc._limits`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from vsockrpc.errors import VsockRpcError
from vsockrpc.rpc._limits import ConnectionLimits, Gate, PeerKey, peer_key

__all__ = ["BUFFER_SIZE", "Dial", "Link", "Passed", "PassedLink", "Relay"]

log = logging.getLogger(__name__)

# Large enough that a 4 MiB gRPC message crosses in a few syscalls; Unix and vsock sockets hand
# over at most their queued bytes per recv anyway.
BUFFER_SIZE = 256 * 1024
_ACCEPT_RETRY_DELAY = 0.05
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # fcntl(2), Linux


class Passed(NamedTuple):
    """What a :data:`Dial` returns when the far side took the accepted socket itself (our
    hybrid device: :func:`vsockrpc.transport.dial_for`): nothing is left to pump, and
    ``lifeline`` stays open for as long as that stream lives (closing it ends the stream)."""

    lifeline: socket.socket


# Given an accepted socket and its peer address (as accept() returned it), open the other side:
# a socket to pump to, or Passed when the other side took the accepted socket.
Dial = Callable[[socket.socket, object], "socket.socket | Passed"]


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


class Link:
    """One relayed connection: pumps ``a → b`` and ``b → a`` until both directions end."""

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        on_done: Callable[[Link], None],
        *,
        splice: bool = True,
    ) -> None:
        self._a = a
        self._splice = splice
        self._b = b
        self._on_done = on_done
        self._lock = threading.Lock()
        self._running = 2
        self._other = threading.Thread(
            target=self._pump, args=(b, a), name="vsockrpc-relay-pump", daemon=True
        )

    def run(self) -> None:
        """Pump ``a → b`` in the calling thread and ``b → a`` in a second thread."""
        try:
            self._other.start()
        except RuntimeError as err:  # can't start a thread: give up on this connection only
            log.warning("relay: %s", err)
            self._a.close()
            self._b.close()
            self._on_done(self)
            return
        self._pump(self._a, self._b)

    def abort(self) -> None:
        """Stop both directions now (wakes both pumps; they close the sockets)."""
        _shutdown(self._a, socket.SHUT_RDWR)
        _shutdown(self._b, socket.SHUT_RDWR)

    def join(self, timeout: float | None = None) -> None:
        if self._other.ident is not None:
            self._other.join(timeout)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            if not (self._splice and _copy_spliced(src, dst)):
                _copy_buffered(src, dst)
            _shutdown(dst, socket.SHUT_WR)  # half-close: the peer sees EOF too
        except OSError as err:
            log.debug("relay connection broken: %s", err)
            self.abort()
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self._a.close()
                self._b.close()
                self._on_done(self)


class PassedLink:
    """A connection the far side took over (:class:`Passed`): nothing to pump. Its worker waits
    for the lifeline to close (the stream ended there); :meth:`abort` shuts the lifeline, which
    ends the stream on the far side, as breaking a pumped link would."""

    def __init__(self, lifeline: socket.socket, on_done: Callable[[PassedLink], None]) -> None:
        self._lifeline = lifeline
        self._on_done = on_done

    def run(self) -> None:
        try:
            with contextlib.suppress(OSError):
                while self._lifeline.recv(64):  # the far side sends nothing after its answer
                    pass
        finally:
            self._lifeline.close()
            self._on_done(self)

    def abort(self) -> None:
        _shutdown(self._lifeline, socket.SHUT_RDWR)

    def join(self, timeout: float | None = None) -> None:
        """Nothing to join: :meth:`run` is the worker's own call."""


def _copy_buffered(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF through a preallocated buffer (recv_into + sendall)."""
    buf = bytearray(BUFFER_SIZE)
    with memoryview(buf) as view:
        recv_into = src.recv_into
        sendall = dst.sendall
        while n := recv_into(buf):
            sendall(view[:n])


def _copy_spliced(src: socket.socket, dst: socket.socket) -> bool:
    """Copy until EOF with splice(2) through a pipe: the bytes never enter Python.

    Returns False, having moved nothing, when the kernel can't splice from ``src`` (EINVAL,
    e.g. a socket family without splice_read on an old kernel); the caller then copies.
    """
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a bigger pipe means fewer syscalls; optional
            fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, BUFFER_SIZE)
        src_fd, dst_fd = src.fileno(), dst.fileno()
        splice = os.splice
        first = True
        while True:
            try:
                n = splice(src_fd, pipe_w, BUFFER_SIZE)
            except OSError as err:
                if first and err.errno == errno.EINVAL:
                    return False
                raise
            first = False
            if not n:
                return True
            while n:
                n -= splice(pipe_r, dst_fd, n)
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


class Relay:
    """Accept on ``listener`` and relay every connection to the socket ``dial`` opens.

    A connection ``dial`` fails to open is closed at once (the dialling side sees EOF: gRPC
    reports UNAVAILABLE and reconnects with backoff); the relay keeps serving the others.
    :meth:`close` stops accepting, breaks all live connections and joins every thread.
    """

    def __init__(
        self,
        listener: socket.socket,
        dial: Dial,
        *,
        name: str = "relay",
        splice: bool = True,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self._listener = listener
        self._gate = Gate(limits) if limits is not None else None
        self.refused_connections = 0
        self.passed_connections = 0  # taken over by the far side (Passed), since the start
        self._splice = splice
        self._dial = dial
        self._name = name
        self._lock = threading.Lock()
        self._closed = False
        self._accepting_stopped = False
        self.last_error: str | None = None
        self._links: set[Link | PassedLink] = set()
        self._workers: set[threading.Thread] = set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"vsockrpc-{name}-accept", daemon=True
        )

    def start(self) -> Relay:
        self._acceptor.start()
        return self

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._links)

    @property
    def waiting_connections(self) -> int:
        """Connections accepted under limits that have not sent their first byte yet."""
        return self._gate.waiting if self._gate is not None else 0

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                self._select_until_woken(selector)
            finally:
                if self._gate is not None:
                    for item in self._gate.waiting_items():
                        self._gate.drop_waiting(item)
                        assert isinstance(item, socket.socket)
                        item.close()

    def _select_until_woken(self, selector: selectors.BaseSelector) -> None:
        gate = self._gate
        while True:
            timeout = None
            if gate is not None and (deadline := gate.next_deadline()) is not None:
                timeout = max(deadline - time.monotonic(), 0.0)
            events = selector.select(timeout)
            for key, _ in events:
                if key.fileobj is self._wake_r:
                    return
            # Waiting connections first: accepting may evict (close) some of them.
            listener_ready = False
            for key, _ in events:
                if key.fileobj is self._listener:
                    listener_ready = True
                elif gate is not None:
                    assert isinstance(key.fileobj, socket.socket)
                    self._first_bytes(selector, gate, key.fileobj, key.data)
            if listener_ready and not self._accept(selector):
                return
            if gate is not None:
                for item in gate.expired(time.monotonic()):
                    assert isinstance(item, socket.socket)
                    selector.unregister(item)
                    item.close()

    def _accept(self, selector: selectors.BaseSelector) -> bool:
        """Accept one connection; False once accepting has been stopped."""
        try:
            conn, peer = self._listener.accept()
        except OSError as err:  # e.g. ECONNABORTED, EMFILE: keep serving
            log.warning("%s: accept failed: %s", self._name, err)
            victim = self._gate.evict_oldest() if self._gate is not None else None
            if isinstance(victim, socket.socket):  # free an fd: the oldest silent one
                selector.unregister(victim)
                victim.close()
            else:
                time.sleep(_ACCEPT_RETRY_DELAY)  # don't spin while out of fds
            return True
        if self._gate is None:
            return self._start_worker(conn, peer, None)
        key = peer_key(conn, peer)
        admitted, evicted = self._gate.admit(conn, key, time.monotonic())
        for victim in evicted:
            assert isinstance(victim, socket.socket)
            selector.unregister(victim)
            victim.close()
        if not admitted:
            self.refused_connections += 1
            log.debug("%s: refused a connection from %r: at the connection limit", self._name, peer)
            conn.close()
            return True
        selector.register(conn, selectors.EVENT_READ, (peer, key))
        return True

    def _first_bytes(
        self, selector: selectors.BaseSelector, gate: Gate, conn: socket.socket, data: object
    ) -> None:
        """A waiting connection became readable: relay it, or drop it at EOF."""
        selector.unregister(conn)
        peer, key = data if isinstance(data, tuple) else (None, ("unknown", None))
        try:
            closed = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if closed:
            gate.drop_waiting(conn)
            conn.close()
            return
        gate.activate(conn)
        self._start_worker(conn, peer, key)

    def _start_worker(self, conn: socket.socket, peer: object, key: PeerKey | None) -> bool:
        """Relay ``conn`` in a new thread; False once accepting has been stopped."""
        worker = threading.Thread(
            target=self._serve,
            args=(conn, peer, key),
            name=f"vsockrpc-{self._name}",
            daemon=True,
        )
        with self._lock:
            if self._accepting_stopped:
                self._release(key)
                conn.close()
                return False
            self._workers.add(worker)
        try:
            worker.start()
        except RuntimeError as err:  # can't start a thread: drop this connection
            log.warning("%s: %s", self._name, err)
            with self._lock:
                self._workers.discard(worker)
            self._release(key)
            conn.close()
        return True

    def _release(self, key: PeerKey | None) -> None:
        if self._gate is not None and key is not None:
            self._gate.release(key)

    def _serve(self, conn: socket.socket, peer: object, key: PeerKey | None = None) -> None:
        try:
            try:
                other = self._dial(conn, peer)
            except (VsockRpcError, OSError) as err:
                log.info("%s: cannot relay connection from %r: %s", self._name, peer, err)
                self.last_error = str(err)
                conn.close()
                return
            except Exception as err:  # a bug in dial: log it, drop this connection only
                log.exception("%s: dialling for %r failed", self._name, peer)
                self.last_error = repr(err)
                conn.close()
                return
            link: Link | PassedLink
            if isinstance(other, Passed):
                conn.close()  # the far side holds the stream now
                link, other = PassedLink(other.lifeline, self._forget), other.lifeline
            else:
                link = Link(conn, other, self._forget, splice=self._splice)
            with self._lock:
                if self._closed:
                    conn.close()
                    other.close()
                    return
                self._links.add(link)
                self.passed_connections += isinstance(link, PassedLink)
            link.run()
            link.join()
        finally:
            self._release(key)
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _forget(self, link: Link | PassedLink) -> None:
        with self._lock:
            self._links.discard(link)

    def stop_accepting(self) -> None:
        """Stop accepting new connections (live ones keep flowing) and close the listener."""
        with self._lock:
            if self._accepting_stopped:
                return
            self._accepting_stopped = True
        self._wake_w.send(b"x")
        if self._acceptor.ident is not None:
            self._acceptor.join()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def close(self) -> None:
        """Stop accepting, break live connections, join all threads."""
        self.stop_accepting()
        with self._lock:
            self._closed = True
            links = list(self._links)
            workers = list(self._workers)
        for link in links:
            link.abort()
        for worker in workers:
            worker.join()
