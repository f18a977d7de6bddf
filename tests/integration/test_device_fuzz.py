"""A hostile guest against the running device (hypothesis): forged packets and corrupted rings.

Checks that no exception escapes the device loop, that it keeps serving a legitimate connection
while garbage flows past it, and that ring corruption is reported on the vring's err fd and
recovers with a guest reset. Cases per property: ``VSOCKRPC_FUZZ_EXAMPLES`` (forged packets,
default 300) and ``VSOCKRPC_FUZZ_RING_EXAMPLES`` (ring corruptions, default a sixth of the
former); ``scripts/soak-device`` runs the long soak (docs/device.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vsockrpc.vhost import VsockDevice
from vsockrpc.vhost.packet import HOST_CID, Op
from vsockrpc.vhost.reactor import Reactor
from vsockrpc.vhost.routes import MAX_PENDING_OUT
from vsockrpc.vhost.sibling import MAX_PENDING_IN, CoHosted
from vsockrpc.vhost.table import MAX_STATELESS_RST
from vsockrpc.vhost.testing import (
    GuestDriver,
    GuestStream,
    pump_all,
    serving,
    serving_together,
    wait_all,
)

CID = 9
MiB = 1 << 20
FUZZ_EXAMPLES = int(os.environ.get("VSOCKRPC_FUZZ_EXAMPLES", "300"))
RING_EXAMPLES = int(os.environ.get("VSOCKRPC_FUZZ_RING_EXAMPLES", max(20, FUZZ_EXAMPLES // 6)))


def _budget(examples: int) -> int:
    """Seconds a property may take: generous (~1 s per case), so a long soak is not cut."""
    return max(600, examples)


DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")


@dataclass
class World:
    device: VsockDevice
    guest: GuestDriver
    host: socket.socket
    stream: GuestStream
    thread: threading.Thread


def _open(device: VsockDevice, guest: GuestDriver, port: int) -> tuple[socket.socket, GuestStream]:
    listener = guest.listeners.get(port) or guest.listen(port)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(device.uds_path)
    s.sendall(f"CONNECT {port}\n".encode())
    stream = guest.accept(listener)
    guest.pump(0.05)
    line = b""
    while not line.endswith(b"\n"):
        c = s.recv(1)
        assert c, "EOF before OK"
        line += c
    return s, stream


def _roundtrip(w: World, tag: bytes) -> None:
    """The legitimate connection still carries data both ways."""
    w.host.sendall(tag)
    got = bytearray()

    def enough() -> bool:
        got.extend(w.stream.recv())
        return len(got) >= len(tag)

    try:
        w.guest.wait_for(enough, 10, "legit data to guest")
    except TimeoutError as err:  # say what the device was doing, for a failure a soak finds
        rings = [(r.state.value, r.last_avail_idx) for r in w.device.rings]
        raise AssertionError(
            f"{err}: got {len(got)} of {len(tag)} bytes; device rings {rings}, guest avail "
            f"{w.guest.avail_idx}, device has_work {w.device.muxer.has_work()}, "
            f"connections {sorted(w.device.muxer.conns)}"
        ) from err
    assert bytes(got) == tag
    w.stream.send(tag[::-1])
    w.guest.pump(0.02)
    back = b""
    while len(back) < len(tag):
        chunk = w.host.recv(100)
        assert chunk
        back += chunk
    assert back == tag[::-1]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    d = tempfile.mkdtemp(prefix="vdf", dir="/tmp")
    vpath, upath = os.path.join(d, "v.sock"), os.path.join(d, "u.sock")
    try:
        with (
            VsockDevice(vhost_socket=vpath, uds_path=upath, guest_cid=CID) as device,
            serving(device) as thread,
            GuestDriver(vpath, guest_cid=CID) as guest,
        ):
            guest.boot()
            host, stream = _open(device, guest, 700)
            w = World(device, guest, host, stream, thread)
            try:
                yield w
            finally:
                w.host.close()  # the ring test replaces it after each reset
    finally:
        shutil.rmtree(d, ignore_errors=True)


packet_strategy = st.fixed_dictionaries(
    {
        "op": st.one_of(st.sampled_from(list(Op)), st.integers(0, 0xFFFF)),
        "src_port": st.one_of(
            st.sampled_from([1, 2, 700, 5000, 2**32 - 1]), st.integers(0, 2**32 - 1)
        ),
        "dst_port": st.one_of(
            st.sampled_from([1, 700, 1 << 30, 2**32 - 1]), st.integers(0, 2**32 - 1)
        ),
        "payload": st.binary(max_size=300),
        "flags": st.integers(0, 2**32 - 1),
        "buf_alloc": st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
        "fwd_cnt": st.integers(0, 2**32 - 1),
        "ptype": st.one_of(st.just(1), st.integers(0, 0xFFFF)),
        "src_cid": st.one_of(st.just(CID), st.integers(0, 2**64 - 1)),
        "dst_cid": st.one_of(st.just(HOST_CID), st.integers(0, 2**64 - 1)),
        "length": st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    }
)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(packets=st.lists(packet_strategy, min_size=1, max_size=8))
@pytest.mark.timeout(_budget(FUZZ_EXAMPLES))
def test_fuzz_forged_packets_do_not_disturb_others(
    world: World, packets: list[dict[str, object]]
) -> None:
    legit = {(world.stream.local_port, world.stream.peer_port)}
    for p in packets:
        if (p["src_port"], p["dst_port"]) in legit:
            continue  # forging the legit connection's own packets may rightly reset it
        world.guest.send_packet(
            p["op"],  # type: ignore[arg-type]
            p["src_port"],  # type: ignore[arg-type]
            p["dst_port"],  # type: ignore[arg-type]
            p["payload"],  # type: ignore[arg-type]
            flags=p["flags"],  # type: ignore[arg-type]
            buf_alloc=p["buf_alloc"],  # type: ignore[arg-type]
            fwd_cnt=p["fwd_cnt"],  # type: ignore[arg-type]
            ptype=p["ptype"],  # type: ignore[arg-type]
            src_cid=p["src_cid"],  # type: ignore[arg-type]
            dst_cid=p["dst_cid"],  # type: ignore[arg-type]
            length=p["length"],  # type: ignore[arg-type]
        )
    world.guest.pump(0.01)
    world.guest.packets.clear()
    assert world.thread.is_alive()
    _roundtrip(world, b"still here")
    # Forged REQUESTs to unknown host ports never create connections.
    legit_key = (HOST_CID, world.stream.peer_port, world.stream.local_port)
    assert set(world.device.muxer.conns) == {legit_key}


def _outcome(w: World, queue: int, rx_avail: int, rx_used: int) -> tuple[bool, bool]:
    """(err fd signalled, ring broken) once the device has dealt with the corrupted ring.

    Dealt with: the ring is broken, or the device took what it was given (every posted tx
    chain; an rx buffer for the byte the host sent, or a used entry for it). The device runs in
    its own thread beside this one, so both are read until they agree and hold still for 5 ms:
    ``break_ring`` marks the ring broken just before it signals the err fd, and a pop advances
    ``last_avail_idx`` just before it validates the chain. A disagreement that lasts 5 s is
    returned as it is, for the caller's assert to report. (Three vhost-user round trips in a
    row did not order after the device's pass over the rings: the device answers every message
    already queued in one callback, before that pass; a 100,000-case soak caught one case in
    5,633 where the ring was read as broken before its err fd was signalled.)"""
    ring = w.device.rings[queue]
    signalled = False
    steady_since: float | None = None
    deadline = time.monotonic() + 5
    while True:
        signalled |= w.guest.err_signalled(queue)
        broken = ring.state.value == "broken"
        if queue == 1:
            taken = ring.last_avail_idx == w.guest.avail_idx[1]
        else:
            used = U16.unpack_from(w.guest.mem, w.guest.used[0] + 2)[0]
            taken = ring.last_avail_idx != rx_avail or used != rx_used
        now = time.monotonic()
        if (broken or taken) and signalled == broken:
            if steady_since is None:
                steady_since = now
            elif now - steady_since >= 0.005:
                return signalled, broken
        else:
            steady_since = None
        if now > deadline:
            return signalled, broken
        time.sleep(0.0005)


@settings(
    max_examples=RING_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    queue=st.sampled_from([0, 1]),
    slot=st.integers(0, 127),
    desc=st.tuples(
        st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0xA0000 - 8, 64 << 20, 0xB0000])),
        st.integers(0, 2**32 - 1),
        st.integers(0, 7),
        st.integers(0, 0xFFFF),
    ),
    avail_jump=st.sampled_from([0, 1, 129, 0x8000]),
)
@pytest.mark.timeout(_budget(RING_EXAMPLES))
def test_fuzz_corrupted_rings_are_reported_and_recover(
    world: World, queue: int, slot: int, desc: tuple[int, int, int, int], avail_jump: int
) -> None:
    g = world.guest
    base = g.avail[queue]
    rx_avail = world.device.rings[0].last_avail_idx
    rx_used = U16.unpack_from(g.mem, g.used[0] + 2)[0]
    if queue == 0 and slot % 2:
        # rx buffers are posted ahead of need, so an appended one is reached only after all the
        # others: in half the rx cases corrupt instead the buffer the device will take next.
        nxt = world.device.rings[0].last_avail_idx
        slot = U16.unpack_from(g.mem, base + 4 + 2 * (nxt % g.num))[0]
    # Corrupt: overwrite a descriptor and post it (or make avail.idx run far ahead).
    DESC.pack_into(g.mem, g.desc[queue] + 16 * (slot % g.num), *desc)
    U16.pack_into(g.mem, base + 4 + 2 * (g.avail_idx[queue] % g.num), slot % g.num)
    g.avail_idx[queue] = (g.avail_idx[queue] + 1 + avail_jump) & 0xFFFF
    U16.pack_into(g.mem, base + 2, g.avail_idx[queue])
    g.kick_queue(queue)
    dropped = False
    if queue == 0:  # rx is only read when the device has something to send: give it a packet
        try:
            world.host.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            # The device may take rx buffers as soon as the kick arrives (it had a control
            # packet due): it found the corruption first and dropped every connection.
            dropped = True
    corrupted, broken = _outcome(world, queue, rx_avail, rx_used)
    event(f"vring {queue} {'corrupted: err fd signalled' if corrupted else 'still valid'}")
    assert corrupted == broken
    assert corrupted or not dropped, "the device dropped the connection without a corrupt ring"
    assert world.thread.is_alive()
    # Whatever happened, a guest reset brings back a working device. Reset first: a corrupt
    # ring left in place could be found later (e.g. when closing the host socket makes the
    # device send SHUTDOWN), and that err signal would be charged to the next example.
    g.reset()
    world.host.close()
    world.host, world.stream = _open(world.device, g, 700)
    _roundtrip(world, b"after reset")


class _Keep(logging.Handler):
    """Keeps every record, as pytest's log capture or a ``MemoryHandler`` does."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(60)
def test_a_kept_corruption_record_holds_no_exception(world: World) -> None:
    # A record whose args hold the RingError holds its traceback, whose frames hold views of
    # guest memory: a handler that keeps records kept every mapping of every reset guest open
    # (a soak ran out of fds that way). The device logs the reason as text.
    g = world.guest
    keep = _Keep()
    logger = logging.getLogger("vsockrpc.vhost")
    logger.addHandler(keep)
    try:
        slot = g.avail_idx[1] % g.num
        DESC.pack_into(g.mem, g.desc[1] + 16 * slot, 1 << 62, 64, 0, 0)  # outside guest memory
        U16.pack_into(g.mem, g.avail[1] + 4 + 2 * slot, slot)
        g.avail_idx[1] = (g.avail_idx[1] + 1) & 0xFFFF
        U16.pack_into(g.mem, g.avail[1] + 2, g.avail_idx[1])
        g.kick_queue(1)
        assert _outcome(world, 1, 0, 0) == (True, True)
    finally:
        logger.removeHandler(keep)
    corrupt = [r for r in keep.records if "corrupted a virtqueue" in r.getMessage()]
    assert corrupt and "vring 1" in corrupt[0].getMessage(), [r.getMessage() for r in keep.records]
    held = [a for r in keep.records for a in (r.args or ()) if isinstance(a, BaseException)]
    assert held == [] and all(r.exc_info is None for r in keep.records)
    g.reset()
    world.host.close()
    world.host, world.stream = _open(world.device, g, 700)
    _roundtrip(world, b"after the kept record")


# ------------------------------------------------------------------ two guests of a group
SIB_A, SIB_B, SIB_OUT = 11, 12, 13  # A and B share group "fz"; SIB_OUT is only in "other"
SIBLING_EXAMPLES = int(
    os.environ.get("VSOCKRPC_FUZZ_SIBLING_EXAMPLES", max(20, FUZZ_EXAMPLES // 6))
)


@dataclass
class Siblings:
    dev_a: VsockDevice
    dev_b: VsockDevice
    guest_a: GuestDriver
    world_b: World  # guest B serving a stream to the host


@pytest.fixture(scope="module", params=["separate", "together"])
def siblings(request: pytest.FixtureRequest) -> Iterator[Siblings]:
    """Guests A and B of group "fz" (and a device outside it): with a device each, or served
    together by one loop on one reactor (one device process for both VMs, in-process links),
    where A's flood and B's host stream share a thread."""
    together = request.param == "together"
    d = tempfile.mkdtemp(prefix="vdfs", dir="/tmp")
    groups = os.path.join(d, "groups")
    try:
        with contextlib.ExitStack() as stack:
            shared = Reactor() if together else None
            if shared is not None:
                stack.callback(shared.close)
            cohosted = CoHosted()
            devs, threads = [], []
            for cid, group in ((SIB_A, "fz"), (SIB_B, "fz"), (SIB_OUT, "other")):
                dev = stack.enter_context(
                    VsockDevice(
                        vhost_socket=os.path.join(d, f"v{cid}"),
                        uds_path=os.path.join(d, f"u{cid}"),
                        guest_cid=cid,
                        groups=[group],
                        groups_dir=groups,
                        **(
                            {"reactor": shared, "cohosted": cohosted}
                            if shared and cid != SIB_OUT
                            else {}
                        ),
                    )
                )
                devs.append(dev)
            if together:
                loop = stack.enter_context(serving_together(devs[:2]))
                threads += [loop, loop]
            else:
                threads += [stack.enter_context(serving(dev)) for dev in devs[:2]]
            threads.append(stack.enter_context(serving(devs[2])))
            guest_a = stack.enter_context(
                GuestDriver(os.path.join(d, f"v{SIB_A}"), guest_cid=SIB_A)
            )
            guest_b = stack.enter_context(
                GuestDriver(os.path.join(d, f"v{SIB_B}"), guest_cid=SIB_B)
            )
            guest_a.boot()
            guest_b.boot()
            host, stream = _open(devs[1], guest_b, 700)
            w = World(devs[1], guest_b, host, stream, threads[1])
            try:
                yield Siblings(devs[0], devs[1], guest_a, w)
            finally:
                w.host.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _check_bounds(s: Siblings) -> None:
    a, b = s.dev_a.muxer, s.dev_b.muxer
    assert len(a._sibling_pending) <= MAX_PENDING_OUT
    assert b.siblings is not None and len(b.siblings._pending) <= MAX_PENDING_IN
    assert b.sibling_counts.get(SIB_A, 0) <= b.sibling_limit()
    assert len(a._stateless) <= MAX_STATELESS_RST
    for dev in (s.dev_a, s.dev_b):
        for conn in list(dev.muxer.conns.values()):
            assert conn.pending_bytes <= conn.buf_alloc


def _let_handshakes_finish(s: Siblings) -> None:
    settle_by = time.monotonic() + 0.2
    while True:
        pump_all([s.guest_a, s.world_b.guest], 0.005)
        if not s.dev_a.muxer._sibling_pending or time.monotonic() > settle_by:
            return


def _settle(s: Siblings) -> None:
    """Guest A reboots (its device drops everything) and guest B closes what A opened: then
    neither device may hold anything but B's host stream."""
    s.guest_a.reset()
    s.guest_a.packets.clear()
    w = s.world_b
    legit = (HOST_CID, w.stream.peer_port, w.stream.local_port)

    def clean() -> bool:
        for listener in w.guest.listeners.values():
            listener.backlog.clear()
        for stream in list(w.guest.streams.values()):
            if stream.peer_cid != HOST_CID and not stream.shut_sent and not stream.shut_pending:
                stream.close()
        w.guest.packets.clear()
        siblings = s.dev_b.muxer.siblings
        return (
            set(s.dev_b.muxer.conns) == {legit}
            and not s.dev_a.muxer.conns
            and siblings is not None
            and not siblings._pending
        )

    wait_all([s.guest_a, w.guest], clean, 30, "sibling connections cleaned up")


sibling_garbage = st.fixed_dictionaries(
    {
        "op": st.one_of(st.just(Op.REQUEST), st.sampled_from(list(Op)), st.integers(0, 0xFFFF)),
        "src_port": st.one_of(st.sampled_from([1, 700, 5000]), st.integers(0, 2**32 - 1)),
        "dst_port": st.one_of(st.sampled_from([700, 701, 1 << 30]), st.integers(0, 2**32 - 1)),
        "payload": st.binary(max_size=200),
        "flags": st.integers(0, 2**32 - 1),
        "buf_alloc": st.one_of(st.just(256 * 1024), st.integers(0, 2**32 - 1)),
        "fwd_cnt": st.integers(0, 2**32 - 1),
        "ptype": st.one_of(st.just(1), st.integers(0, 0xFFFF)),
        "src_cid": st.one_of(st.just(SIB_A), st.integers(0, 2**64 - 1)),
        "dst_cid": st.one_of(
            st.sampled_from([SIB_B, SIB_OUT, 99, HOST_CID, SIB_A, 0, 1, 2**32 - 1]),
            st.integers(0, 2**64 - 1),
        ),
        "length": st.one_of(st.none(), st.integers(0, 2**32 - 1)),
        "repeat": st.integers(1, 40),  # a flood: the same packet from consecutive ports
    }
)
# Well-formed packets on a few ports, so connects to B succeed and later packets (data,
# shutdowns, resets, credit) land on live sibling connections.
sibling_wellformed = st.fixed_dictionaries(
    {
        "op": st.sampled_from([Op.REQUEST] * 4 + list(Op)),
        "src_port": st.sampled_from([5000, 5001, 5002]),
        "dst_port": st.sampled_from([700, 701]),
        "payload": st.binary(min_size=1, max_size=200),
        "flags": st.sampled_from([0, 1, 2, 3]),
        "buf_alloc": st.just(256 * 1024),
        "fwd_cnt": st.just(0),
        "ptype": st.just(1),
        "src_cid": st.just(SIB_A),
        "dst_cid": st.sampled_from([SIB_B, SIB_B, SIB_OUT, 99]),
        "length": st.none(),
        "repeat": st.sampled_from([1, 1, 2, 40]),
        # then, on the same ports once the connect had its chance: data, shutdowns, resets…
        "then": st.lists(
            st.sampled_from([Op.RW, Op.RW, Op.RW, Op.SHUTDOWN, Op.CREDIT_REQUEST, Op.RST]),
            max_size=4,
        ),
    }
)
sibling_packet = st.one_of(sibling_wellformed, sibling_garbage)


@settings(
    max_examples=SIBLING_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(packets=st.lists(sibling_packet, min_size=1, max_size=8))
@pytest.mark.timeout(_budget(SIBLING_EXAMPLES))
def test_fuzz_guest_a_floods_siblings_while_guest_b_serves_the_host(
    siblings: Siblings, packets: list[dict[str, Any]]
) -> None:
    w = siblings.world_b
    w.host.sendall(b"during the flood")  # B's host stream is busy while A floods
    sent = 0
    for p in packets:
        for i in range(p["repeat"]):
            siblings.guest_a.send_packet(
                p["op"],
                (p["src_port"] + i) & 0xFFFFFFFF,
                p["dst_port"],
                p["payload"],
                flags=p["flags"],
                buf_alloc=p["buf_alloc"],
                fwd_cnt=p["fwd_cnt"],
                ptype=p["ptype"],
                src_cid=p["src_cid"],
                dst_cid=p["dst_cid"],
                length=p["length"],
                kick=i % 8 == 7,
            )
            sent += 1
        siblings.guest_a.kick_queue(1)
        # Let handshakes complete before the next packets (which may carry data on them).
        _let_handshakes_finish(siblings)
        for op in p.get("then", []):
            siblings.guest_a.send_packet(
                op,
                p["src_port"],
                p["dst_port"],
                p["payload"] if op == Op.RW else b"",
                flags=p["flags"],
                dst_cid=p["dst_cid"],
            )
        pump_all([siblings.guest_a, w.guest], 0.005)
    event(f"{'flood' if sent > 64 else 'burst'} of forged packets from guest A")
    pump_all([siblings.guest_a, w.guest], 0.01)
    _check_bounds(siblings)
    got = bytearray()

    def enough() -> bool:
        got.extend(w.stream.recv())
        return len(got) >= 16

    wait_all([siblings.guest_a, w.guest], enough, 10, "B's host stream during the flood")
    assert bytes(got) == b"during the flood"
    _roundtrip(w, b"B still serves the host")
    _check_bounds(siblings)
    assert w.thread.is_alive()
    linked = sum(1 for st_ in w.guest.streams.values() if st_.peer_cid == SIB_A)
    event(f"guest B accepted {'some' if linked else 'no'} connections from guest A")
    carried = sum(st_.received for st_ in w.guest.streams.values() if st_.peer_cid == SIB_A)
    event(f"{'some' if carried else 'no'} data from guest A reached guest B")
    _settle(siblings)


@pytest.mark.timeout(180)
def test_connect_flood_to_siblings_and_non_members_does_not_starve_b(siblings: Siblings) -> None:
    """600 connects to B and 600 to CIDs outside the group, while the host streams 8 MiB into
    guest B: B's stream completes intact, A's refusals are immediate, everything stays bounded."""
    w = siblings.world_b
    ga = siblings.guest_a
    w.stream.discard = True
    before = w.stream.received
    size = 8 * MiB
    sender = threading.Thread(target=w.host.sendall, args=(bytes(size),), daemon=True)
    sender.start()
    for i in range(600):
        for dst in (SIB_B, SIB_OUT, 99) if i % 2 else (SIB_B,):
            ga.send_packet(Op.REQUEST, 20000 + i, 700, dst_cid=dst, kick=i % 16 == 0)
        pump_all([ga, w.guest])
    ga.kick_queue(1)
    wait_all([ga, w.guest], lambda: w.stream.received - before >= size, 120, "B's 8 MiB")
    sender.join(10)
    _check_bounds(siblings)
    limit = siblings.dev_b.muxer.sibling_limit()
    assert siblings.dev_b.muxer.sibling_counts.get(SIB_A, 0) <= limit
    w.stream.discard = False
    _roundtrip(w, b"after the flood")
    linked = sum(1 for st_ in w.guest.streams.values() if st_.peer_cid == SIB_A)
    assert 0 < linked <= limit  # the flood did reach B, within the per-CID cap
    assert siblings.dev_a.muxer.stats_sibling_refused >= 600  # non-members, refused at once
    _settle(siblings)
