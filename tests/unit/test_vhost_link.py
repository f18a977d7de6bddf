"""In-process links (vsockrpc.vhost.link) and the reactor's virtual fds: the socket semantics
the connection table relies on, and events delivered without a system call."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from vsockrpc.vhost.link import LinkEnd, link_pair
from vsockrpc.vhost.reactor import ERR, ET, IN, OUT, Reactor

pytestmark = pytest.mark.unit


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    try:
        yield r
    finally:
        r.close()


class Events:
    """Registers a link end and records what the reactor delivers to it."""

    def __init__(self, reactor: Reactor, end: LinkEnd, mask: int = IN | ERR | ET) -> None:
        self.got: list[int] = []
        reactor.register(end.fileno(), mask, self.got.append)


def test_bytes_cross_and_one_edge_per_empty_to_nonempty(reactor: Reactor) -> None:
    a, b = link_pair(reactor)
    assert a.fileno() < -1 and b.fileno() < -1 and a.fileno() != b.fileno()
    seen = Events(reactor, b)
    reactor.poll(0)
    assert seen.got == [], "nothing to read yet"
    assert a.send(b"hello ") == 6
    assert a.send(memoryview(b"world")) == 5
    start = time.monotonic()
    reactor.poll(-1)  # a posted event means no waiting, even with no timeout
    assert time.monotonic() - start < 1
    assert seen.got == [IN], "one edge for the two sends"
    buf = bytearray(64)
    n = b.recv_into(memoryview(buf))
    assert bytes(buf[:n]) == b"hello world"
    with pytest.raises(BlockingIOError):
        b.recv_into(memoryview(buf))


def test_recvmsg_into_scatters_and_recv_takes_at_most_what_is_asked(reactor: Reactor) -> None:
    a, b = link_pair(reactor)
    a.send(b"abcdefghij")
    first, second = bytearray(4), bytearray(4)
    n, anc, flags, _addr = b.recvmsg_into([memoryview(first), memoryview(second)])
    assert (n, anc, flags) == (8, [], 0)
    assert bytes(first + second) == b"abcdefgh"
    assert b.recv(100) == b"ij"


def test_capacity_bounds_a_direction_and_draining_posts_out(reactor: Reactor) -> None:
    a, b = link_pair(reactor, capacity=10)
    writer = Events(reactor, a, IN | OUT | ERR | ET)
    reactor.poll(0)
    assert writer.got == [OUT], "a registration reports the current readiness: room to write"
    writer.got.clear()
    assert a.send(b"0123456789abc") == 10, "short write at capacity"
    with pytest.raises(BlockingIOError):
        a.send(b"x")
    assert b.recv(4) == b"0123"
    reactor.poll(0)
    assert writer.got == [OUT], "room again after a full link was read"
    assert a.send(b"wxyz!") == 4


def test_shutdown_write_gives_the_rest_then_end_of_stream(reactor: Reactor) -> None:
    a, b = link_pair(reactor)
    seen = Events(reactor, b)
    a.send(b"last")
    a.shutdown(socket.SHUT_WR)
    reactor.poll(0)
    assert seen.got[0] == IN and seen.got[-1] & ERR, "data, then the hang-up"
    assert b.recv(100) == b"last"
    assert b.recv_into(memoryview(bytearray(8))) == 0, "end-of-stream, not EAGAIN"
    with pytest.raises(BrokenPipeError):
        a.send(b"more")
    assert b.send(b"the other way still works") == 25
    assert a.recv(100) == b"the other way still works"


def test_close_ends_the_stream_for_the_peer_and_breaks_its_writes(reactor: Reactor) -> None:
    a, b = link_pair(reactor)
    seen = Events(reactor, b)
    a.send(b"bye")
    a.close()
    a.close()  # idempotent
    reactor.poll(0)
    assert any(m & ERR for m in seen.got)
    assert b.recv(10) == b"bye" and b.recv(10) == b""
    with pytest.raises(BrokenPipeError):
        b.send(b"anyone?")
    with pytest.raises(OSError):
        a.recv(1)
    b.close()


def test_events_for_an_unregistered_end_are_dropped(reactor: Reactor) -> None:
    a, b = link_pair(reactor)
    seen = Events(reactor, b)
    a.send(b"x")
    reactor.unregister(b.fileno())
    reactor.poll(0)
    assert seen.got == []
    assert not reactor.has_posted


def test_out_is_not_delivered_to_an_end_registered_without_it(reactor: Reactor) -> None:
    a, b = link_pair(reactor, capacity=4)
    seen = Events(reactor, a, IN | ERR | ET)
    a.send(b"full")
    b.recv(4)
    reactor.poll(0)
    assert seen.got == []


class Receiver:
    """A reader's cut-through: takes up to ``limit`` bytes per offer (link.py, "Cut-through")."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.got = bytearray()
        self.offers = 0

    def __call__(self, data: memoryview) -> int:
        self.offers += 1
        n = min(self.limit, len(data))
        self.got += data[:n]
        return n


def test_a_receiver_takes_bytes_before_the_inbox_and_no_event_is_posted(
    reactor: Reactor,
) -> None:
    a, b = link_pair(reactor)
    seen = Events(reactor, b)
    b.receiver = take = Receiver(1 << 20)
    assert a.send(b"ping") == 4
    assert bytes(take.got) == b"ping"
    assert not reactor.has_posted, "nothing waits in the inbox: no IN edge"
    reactor.poll(0)
    assert seen.got == []
    with pytest.raises(BlockingIOError):
        b.recv(10)


def test_what_a_receiver_leaves_goes_to_the_inbox_and_keeps_its_order(reactor: Reactor) -> None:
    a, b = link_pair(reactor, capacity=8)
    seen = Events(reactor, b)
    b.receiver = take = Receiver(3)
    assert a.send(b"abcdefghijklmno") == 3 + 8, "3 taken, 8 queued, the rest is a short write"
    assert bytes(take.got) == b"abc"
    reactor.poll(0)
    assert seen.got == [IN], "the queued part raises the usual edge"
    # While bytes wait unread, later ones queue behind them: the receiver is not asked.
    offers = take.offers
    with pytest.raises(BlockingIOError):
        a.send(b"p")
    assert b.recv(100) == b"defghijk"
    assert a.send(b"pq") == 2
    assert take.offers == offers + 1 and bytes(take.got) == b"abcpq"


def test_a_receiver_that_takes_nothing_leaves_the_socket_semantics(reactor: Reactor) -> None:
    a, b = link_pair(reactor, capacity=4)
    b.receiver = take = Receiver(0)
    assert a.send(b"12345") == 4
    assert take.offers == 1
    with pytest.raises(BlockingIOError):
        a.send(b"6")
    assert b.recv(10) == b"1234"


@pytest.mark.parametrize("took", [0, 1])
def test_a_receiver_that_drops_the_stream_breaks_the_write(reactor: Reactor, took: int) -> None:
    a, b = link_pair(reactor)

    def take_then_close(data: memoryview) -> int:
        b.close()  # e.g. its guest's ring turned out corrupt: the connection is dropped
        return took

    b.receiver = take_then_close
    with pytest.raises(BrokenPipeError):
        a.send(b"xy")
    assert b.receiver is None, "a closed end holds no receiver (nor its connection)"


def test_call_soon_runs_with_the_posted_events_and_poll_does_not_wait(reactor: Reactor) -> None:
    ran: list[str] = []
    a, b = link_pair(reactor)
    seen = Events(reactor, b)
    reactor.call_soon(lambda: ran.append("soon"))
    assert reactor.has_posted
    start = time.monotonic()
    reactor.poll(-1)
    assert time.monotonic() - start < 1, "a queued callback means no waiting"
    assert ran == ["soon"] and not reactor.has_posted
    a.send(b"x")
    reactor.call_soon(lambda: ran.append(f"after {seen.got}"))
    reactor.deliver_posted()
    assert ran == ["soon", f"after {[IN]}"], "callbacks run after the virtual events"
