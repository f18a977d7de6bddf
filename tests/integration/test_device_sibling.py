"""Sibling routing: two devices of one group, each with its test-driver guest, in this process.
Guest A (CID 5) connects to guest B (CID 6) by CID; a third device (CID 7) belongs to another
group. docs/device.md, "Sibling routing". Every test runs twice: with A and B as separate
devices (one thread each, linked by the group's Unix sockets, as two device processes are), and
with A and B served together on one reactor (one device process for both VMs: an in-process
link, no socket)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from vsockrpc.vhost import VsockDevice
from vsockrpc.vhost.link import LinkEnd
from vsockrpc.vhost.packet import SHUTDOWN_SEND, Op
from vsockrpc.vhost.reactor import Reactor
from vsockrpc.vhost.sibling import CoHosted
from vsockrpc.vhost.testing import (
    GuestDriver,
    GuestStream,
    pump_all,
    serving,
    serving_together,
    wait_all,
)
from vsockrpc.vhost.testing.rings import DESC, DESC_F_WRITE, U16, RxLayout

A, B, C = 5, 6, 7
GROUP = "g"
PORT = 9000
MiB = 1 << 20

pytestmark = pytest.mark.timeout(120)


@dataclass
class Pair:
    together: bool  # A and B served by one loop (one process for both VMs)
    groups_dir: str
    dev_a: VsockDevice
    dev_b: VsockDevice
    guest_a: GuestDriver
    guest_b: GuestDriver

    @property
    def guests(self) -> list[GuestDriver]:
        return [self.guest_a, self.guest_b]

    def wait(self, predicate: object, timeout: float = 10, what: str = "") -> None:
        wait_all(self.guests, predicate, timeout, what)  # type: ignore[arg-type]

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pump_all(self.guests, 0.01)


@pytest.fixture(params=["separate", "together"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    with open_pair(together=request.param == "together") as p:
        yield p


@contextlib.contextmanager
def open_pair(*, together: bool, guest_b: dict[str, Any] | None = None) -> Iterator[Pair]:
    """Guests A and B of group GROUP, with a device each or served together by one loop (one
    device process for both VMs), and C's device in another group; ``guest_b``: options for
    B's test driver (credit, queue size, rx layout)."""
    d = tempfile.mkdtemp(prefix="vsib", dir="/tmp")
    groups = os.path.join(d, "groups")
    try:
        with contextlib.ExitStack() as stack:
            shared = Reactor() if together else None
            if shared is not None:
                stack.callback(shared.close)
            cohosted = CoHosted()
            devs, guests = [], []
            for cid, group in ((A, GROUP), (B, GROUP), (C, "other")):
                vpath = os.path.join(d, f"v{cid}")
                dev = stack.enter_context(
                    VsockDevice(
                        vhost_socket=vpath,
                        uds_path=os.path.join(d, f"u{cid}"),
                        guest_cid=cid,
                        groups=[group],
                        groups_dir=groups,
                        **(
                            {"reactor": shared, "cohosted": cohosted}
                            if cid != C and together
                            else {}
                        ),
                    )
                )
                devs.append(dev)
            if together:
                stack.enter_context(serving_together(devs[:2]))
            else:
                stack.enter_context(serving(devs[0]))
                stack.enter_context(serving(devs[1]))
            stack.enter_context(serving(devs[2]))
            for cid, options in ((A, {}), (B, guest_b or {})):  # C's guest never boots
                path = os.path.join(d, f"v{cid}")
                guest = stack.enter_context(GuestDriver(path, guest_cid=cid, **options))
                guest.boot()
                guests.append(guest)
            yield Pair(together, groups, devs[0], devs[1], guests[0], guests[1])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def connect(p: Pair, port: int = PORT, cid: int = B) -> tuple[GuestStream, GuestStream]:
    """Guest A connects to ``cid:port`` (B listening there); both ends."""
    listener = p.guest_b.listeners.get(port) or p.guest_b.listen(port)
    a = p.guest_a.connect_start(port, cid=cid)
    p.wait(lambda: a.state.value != "connecting", 10, "A's connect")
    assert a.state.value == "established", "sibling connect was refused"
    p.wait(lambda: bool(listener.backlog), 5, "B's accept")
    return a, listener.backlog.popleft()


def refused_quickly(p: Pair, cid: int, port: int = PORT) -> float:
    start = time.monotonic()
    stream = p.guest_a.connect_start(port, cid=cid)
    p.wait(lambda: stream.state.value != "connecting", 5, "refusal")
    assert stream.reset and stream.state.value == "closed"
    return time.monotonic() - start


def test_guest_a_reaches_guest_b_by_cid_and_b_sees_a_real_cid(pair: Pair) -> None:
    a, b = connect(pair)
    assert (b.peer_cid, b.peer_port) == (A, a.local_port)  # A's real address, not CID 2
    assert (a.peer_cid, a.peer_port) == (B, PORT)
    a.send(b"ping")
    pair.wait(lambda: len(b.rxbuf) >= 4, 5, "ping")
    assert b.recv() == b"ping"
    b.send(b"pong")
    pair.wait(lambda: len(a.rxbuf) >= 4, 5, "pong")
    assert a.recv() == b"pong"
    # Each device keys the stream by the other guest's CID, beside any host connections.
    assert set(pair.dev_a.muxer.conns) == {(B, PORT, a.local_port)}
    assert set(pair.dev_b.muxer.conns) == {(A, a.local_port, PORT)}
    # Served together, the two are joined in-process; apart, by a socket between the devices.
    links = [
        isinstance(c.sock, LinkEnd)
        for d in (pair.dev_a, pair.dev_b)
        for c in d.muxer.conns.values()
    ]
    assert links == [pair.together, pair.together]


def stream_checksummed(p: Pair, size: int, *, both_ways: bool, timeout: float) -> None:
    """``size`` random bytes A → B (and B → A at the same time if ``both_ways``), checked by
    SHA-256; at every step no device holds more than its buf_alloc for a stream nor has sent
    past the other guest's credit."""
    a, b = connect(p)
    flows = [(a, b), (b, a)] if both_ways else [(a, b)]
    payloads = [os.urandom(size) for _ in flows]
    for (sender, _), payload in zip(flows, payloads, strict=True):
        sender.send(payload)
    digests = [hashlib.sha256() for _ in flows]
    counts = [0 for _ in flows]

    def drained() -> bool:
        for i, (_, receiver) in enumerate(flows):
            data = receiver.recv()
            digests[i].update(data)
            counts[i] += len(data)
        for dev in (p.dev_a, p.dev_b):
            for conn in dev.muxer.conns.values():
                assert conn.pending_bytes <= conn.buf_alloc
                assert conn.peer_free() >= 0, "sent past the guest's credit"
        return all(count >= size for count in counts)

    p.wait(drained, timeout, f"{size} bytes {'each way' if both_ways else 'A → B'}")
    assert counts == [size for _ in flows]
    for digest, payload in zip(digests, payloads, strict=True):
        assert digest.digest() == hashlib.sha256(payload).digest()


def test_four_mib_each_way_checksummed_with_credit_flow(pair: Pair) -> None:
    stream_checksummed(pair, 4 * MiB, both_ways=True, timeout=90)


def test_half_close_is_honoured_both_ways(pair: Pair) -> None:
    a, b = connect(pair)
    a.send(b"last words")
    a.shutdown(SHUTDOWN_SEND)
    pair.wait(lambda: bool(b.peer_shutdown & SHUTDOWN_SEND), 5, "B sees A's EOF")
    assert b.recv() == b"last words"
    b.send(b"still talking")  # B's direction stays open
    pair.wait(lambda: len(a.rxbuf) >= 13, 5, "B → A after A's half-close")
    assert a.recv() == b"still talking" and not a.eof
    b.shutdown(SHUTDOWN_SEND)
    pair.wait(lambda: a.eof, 5, "A sees B's EOF")
    a.close()
    b.close()
    pair.wait(lambda: not pair.dev_a.muxer.conns and not pair.dev_b.muxer.conns, 10, "both closed")


@pytest.mark.parametrize("resetter", ["a", "b"])
def test_reset_is_honoured_both_ways(pair: Pair, resetter: str) -> None:
    a, b = connect(pair)
    mine, theirs = (a, b) if resetter == "a" else (b, a)
    guest = pair.guest_a if resetter == "a" else pair.guest_b
    other_cid = B if resetter == "a" else A
    guest.send_packet(Op.RST, mine.local_port, mine.peer_port, dst_cid=other_cid)
    del guest.streams[(other_cid, mine.local_port, mine.peer_port)]
    own_dev = pair.dev_a if resetter == "a" else pair.dev_b
    other_dev = pair.dev_b if resetter == "a" else pair.dev_a
    pair.wait(lambda: not own_dev.muxer.conns, 5, "the resetting side forgets the stream")
    # The other guest's stream ends: EOF at once, and RST on its next send.
    pair.wait(lambda: theirs.eof, 5, "the other side sees the end")
    theirs.send(b"anyone?")
    pair.wait(lambda: theirs.reset, 5, "the other side is reset")
    pair.wait(lambda: not other_dev.muxer.conns, 5, "the other device forgets it too")


def test_no_listener_on_b_gives_a_prompt_rst(pair: Pair) -> None:
    assert refused_quickly(pair, B, port=4444) < 1.0
    pair.pump(0.05)
    assert not pair.dev_a.muxer.conns and not pair.dev_b.muxer.conns


@pytest.mark.parametrize("cid", [C, 99])
def test_cid_outside_the_groups_is_refused_at_once_and_logged(
    pair: Pair, caplog: pytest.LogCaptureFixture, cid: int
) -> None:
    with caplog.at_level(logging.INFO, logger="vsockrpc.vhost"):
        assert refused_quickly(pair, cid) < 1.0
    assert f"guest CID {A} → CID {cid} port {PORT}: not in a shared group, refused" in caplog.text
    assert not pair.dev_a.muxer.conns


def test_an_isolated_guest_is_refused_at_once() -> None:
    d = tempfile.mkdtemp(prefix="viso", dir="/tmp")
    try:
        vpath = os.path.join(d, "v")
        with (
            VsockDevice(vhost_socket=vpath, uds_path=os.path.join(d, "u"), guest_cid=A) as dev,
            serving(dev),
            GuestDriver(vpath, guest_cid=A) as guest,
        ):
            guest.boot()
            start = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                guest.connect(PORT, cid=B)
            assert time.monotonic() - start < 1.0
            assert not dev.muxer.conns
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_forged_src_cid_from_guest_a_is_dropped(pair: Pair) -> None:
    listener = pair.guest_b.listen(PORT)
    for forged in (C, B, 2, 0):
        pair.guest_a.send_packet(Op.REQUEST, 40000 + forged, PORT, src_cid=forged, dst_cid=B)
    pair.pump(0.3)
    assert not listener.backlog
    assert not pair.dev_a.muxer.conns and not pair.dev_b.muxer.conns
    assert not pair.guest_a.packets  # dropped: not even an RST


def _hand_handshake(p: Pair, line: bytes) -> bytes:
    """Dial B's group socket by hand, send ``line``, return what comes back before EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(os.path.join(p.groups_dir, GROUP, f"{B}.sock"))
        s.sendall(line)
        got = b""
        end = time.monotonic() + 5
        while time.monotonic() < end:
            pump_all(p.guests, 0.01)
            s.settimeout(0.01)
            try:
                chunk = s.recv(16)
            except TimeoutError:
                continue
            except ConnectionResetError:  # closed with our unread bytes in its buffer
                break
            if not chunk:
                break
            got += chunk
        return got


def test_a_handshake_claiming_another_cid_is_refused(pair: Pair) -> None:
    listener = pair.guest_b.listen(PORT)
    # A member's pid file names another live process: this process cannot claim its CID.
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            pid_file = os.path.join(pair.groups_dir, GROUP, "8.pid")
            with open(pid_file, "w") as f:
                f.write(f"{other.pid}\n")
            bad = [
                b"SIBLING g 8 1234 9000\n",  # someone else's CID
                b"SIBLING g 9 1234 9000\n",  # no such member
                b"SIBLING g 6 1234 9000\n",  # B's own CID
                b"SIBLING other 5 1234 9000\n",  # not the dialled group
                b"SIBLING g 5 99999999999 9000\n",  # port out of range
                b"HELLO\n",
                b"SIBLING g 5 1234 " + b"9" * 200,  # too long, no newline
            ]
            for line in bad:
                assert _hand_handshake(pair, line) == b"", line
            assert not listener.backlog and not pair.dev_b.muxer.conns
        finally:
            other.kill()
    # Control: this process holds CID 5 (device A runs in it), so that claim is honoured.
    assert _hand_handshake(pair, b"SIBLING g 5 1234 9000\n") == b"OK\n"
    assert listener.backlog[0].peer_cid == A and listener.backlog[0].peer_port == 1234


def test_one_sibling_cannot_take_more_than_a_quarter_of_the_connections() -> None:
    d = tempfile.mkdtemp(prefix="vcap", dir="/tmp")
    groups = os.path.join(d, "groups")
    try:
        with contextlib.ExitStack() as stack:
            guests = []
            for cid in (A, B):
                vpath = os.path.join(d, f"v{cid}")
                dev = stack.enter_context(
                    VsockDevice(
                        vhost_socket=vpath,
                        uds_path=os.path.join(d, f"u{cid}"),
                        guest_cid=cid,
                        groups=[GROUP],
                        groups_dir=groups,
                        max_connections=16,
                    )
                )
                stack.enter_context(serving(dev))
                guest = stack.enter_context(GuestDriver(vpath, guest_cid=cid))
                guest.boot()
                guests.append((dev, guest))
            (_dev_a, guest_a), (dev_b, guest_b) = guests
            listener = guest_b.listen(PORT)
            streams = [guest_a.connect_start(PORT, cid=B) for _ in range(8)]
            wait_all(
                [guest_a, guest_b],
                lambda: all(s.state.value != "connecting" for s in streams),
                10,
                "8 connects",
            )
            ok = [s for s in streams if s.state.value == "established"]
            assert len(ok) == 4 == len(listener.backlog)  # 16 // 4
            assert dev_b.muxer.sibling_counts == {A: 4}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_cid_2_still_reaches_the_host_beside_a_sibling_stream(pair: Pair) -> None:
    """What VMADDR_FLAG_TO_HOST asks for: CID 2 is the host, groups or not."""
    host_path = pair.dev_a.uds_path + "_7000"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(host_path)
        srv.listen()
        srv.settimeout(10)
        sib, _ = connect(pair)
        to_host = pair.guest_a.connect_start(7000)
        pair.wait(lambda: to_host.state.value != "connecting", 5, "connect to the host")
        assert to_host.state.value == "established" and to_host.peer_cid == 2
        peer, _ = srv.accept()
        with peer:
            peer.settimeout(10)
            to_host.send(b"host?")
            pair.pump(0.2)
            assert peer.recv(16) == b"host?"
        assert set(pair.dev_a.muxer.conns) == {
            (B, PORT, sib.local_port),
            (2, 7000, to_host.local_port),
        }


# ------------------------------------------------------------------ cut-through (link.py)
def test_served_together_each_message_is_cut_through(pair: Pair) -> None:
    """One device process: a message goes from A's tx buffer straight into B's rx buffer
    (counted per device as packets cut through); apart, never."""
    a, b = connect(pair)
    devs = (pair.dev_a, pair.dev_b)
    before = [d.muxer.stats_packets_direct for d in devs]
    for i in range(20):
        msg = bytes([65 + i]) * 64
        a.send(msg)
        pair.wait(lambda: len(b.rxbuf) >= 64, 5, "A → B")
        assert b.recv(64) == msg
        b.send(msg[::-1].lower())
        pair.wait(lambda: len(a.rxbuf) >= 64, 5, "B → A")
        assert a.recv(64) == msg.lower()
    cut = [d.muxer.stats_packets_direct - n for d, n in zip(devs, before, strict=True)]
    assert cut == ([20, 20] if pair.together else [0, 0])


def test_cut_through_within_small_credit_and_few_rx_buffers_keeps_every_byte() -> None:
    """B grants 8 KiB of credit and posts 8 rx buffers: A's 64 KiB packets are cut through in
    part, the rest waits in the link and B's device sends it as credit and buffers come."""
    with open_pair(together=True, guest_b={"buf_alloc": 8192, "queue_size": 8}) as p:
        stream_checksummed(p, 2 * MiB, both_ways=False, timeout=60)
        direct, total = p.dev_b.muxer.stats_packets_direct, p.dev_b.muxer.stats_packets_rx
        assert 0 < direct < total, (direct, total)


def test_split_rx_buffers_take_the_link_and_lose_nothing() -> None:
    """Rx buffers posted as [header][payload] pairs (older kernels) are not cut through into."""
    with open_pair(together=True, guest_b={"rx_layout": RxLayout.SPLIT}) as p:
        stream_checksummed(p, 1 * MiB, both_ways=False, timeout=60)
        assert p.dev_b.muxer.stats_packets_direct == 0
        assert p.dev_b.muxer.stats_packets_rx > 256


def test_a_corrupt_rx_ring_found_by_a_cut_through_stops_only_that_guest() -> None:
    """B's rx ring is corrupt when A's pass writes into it: B's ring is stopped and reported
    (err fd), the stream is reset for A, and A's device serves on (a new connect from A is
    refused by B until B resets, then works)."""
    with open_pair(together=True) as p:
        a, _ = connect(p)
        g = p.guest_b
        # The next rx buffer the device takes points outside guest memory.
        ring = p.dev_b.rings[0]
        slot = U16.unpack_from(g.mem, g.avail[0] + 4 + 2 * (ring.last_avail_idx % g.num))[0]
        DESC.pack_into(g.mem, g.desc[0] + 16 * slot, 1 << 40, 4096, DESC_F_WRITE, 0)
        a.send(b"x" * 64)
        p.wait(lambda: ring.state.value == "broken", 5, "B's rx ring stopped")
        assert g.err_signalled(0)
        p.wait(lambda: a.reset or a.eof, 5, "A's stream ends")
        p.wait(lambda: not p.dev_b.muxer.conns, 5, "B's device dropped its connections")
        assert p.dev_a.muxer.rx is not None and p.dev_a.muxer.rx.ready, "A's rings untouched"
        g.reset()
        a2, b2 = connect(p, port=PORT + 1)
        a2.send(b"after")
        p.wait(lambda: len(b2.rxbuf) >= 5, 5, "A → B after B's reset")
        assert b2.recv() == b"after"
