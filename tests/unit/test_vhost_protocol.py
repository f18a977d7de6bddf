"""vhost-user message parsing (QEMU docs/interop/vhost-user.rst) and the session's guard:
header bounds, payload sizes, vring indices, memory tables, and which requests a session state
allows. Pure logic: payloads are bytes, the front-end is a fake that records replies."""

from __future__ import annotations

import pytest

from vsockrpc.errors import ProtocolError
from vsockrpc.vhost import protocol as vu
from vsockrpc.vhost.protocol import Message, Request
from vsockrpc.vhost.session import (
    ANY_SESSION,
    OWNED_SESSION,
    SessionState,
    StateError,
    VhostUserSession,
)
from vsockrpc.vhost.virtqueue import Virtqueue


# ---------------------------------------------------------------------- header
def test_header_parses_native_fields() -> None:
    data = vu.HEADER.pack(Request.GET_FEATURES, vu.FLAG_VERSION, 0)
    assert vu.parse_header(data) == (1, 1, 0)


def test_header_size_is_bounded() -> None:
    ok = vu.HEADER.pack(Request.SET_MEM_TABLE, 1, vu.MAX_PAYLOAD)
    assert vu.parse_header(ok)[2] == vu.MAX_PAYLOAD
    with pytest.raises(ProtocolError, match="too large"):
        vu.parse_header(vu.HEADER.pack(Request.SET_MEM_TABLE, 1, vu.MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="too large"):
        vu.parse_header(vu.HEADER.pack(Request.SET_MEM_TABLE, 1, 0xFFFFFFFF))


@pytest.mark.parametrize("size", [0, 11, 13])
def test_header_must_be_12_bytes(size: int) -> None:
    with pytest.raises(ProtocolError):
        vu.parse_header(bytes(size))


# ---------------------------------------------------------------------- payloads
@pytest.mark.parametrize("size", [0, 4, 7, 9, 16])
def test_u64_payload_must_be_8_bytes(size: int) -> None:
    with pytest.raises(ProtocolError):
        vu.parse_u64(bytes(size))


def test_u64_payload() -> None:
    assert vu.parse_u64(vu.U64.pack(0x1_4000_0000)) == 0x1_4000_0000


def test_vring_state_size_and_index() -> None:
    assert vu.parse_vring_state(vu.VRING_STATE.pack(1, 128), 2) == (1, 128)
    with pytest.raises(ProtocolError, match="index 2"):
        vu.parse_vring_state(vu.VRING_STATE.pack(2, 128), 2)
    with pytest.raises(ProtocolError, match="index 4294967295"):
        vu.parse_vring_state(vu.VRING_STATE.pack(0xFFFFFFFF, 0), 2)
    with pytest.raises(ProtocolError):
        vu.parse_vring_state(bytes(7), 2)
    with pytest.raises(ProtocolError):
        vu.parse_vring_state(bytes(12), 2)


def test_vring_addr_order_is_desc_used_avail() -> None:
    payload = vu.VRING_ADDR.pack(1, 0, 0x1000, 0x2000, 0x3000, 0)
    assert vu.parse_vring_addr(payload, 2) == (1, 0x1000, 0x2000, 0x3000)
    with pytest.raises(ProtocolError):
        vu.parse_vring_addr(payload[:-1], 2)
    with pytest.raises(ProtocolError):
        vu.parse_vring_addr(vu.VRING_ADDR.pack(5, 0, 0, 0, 0, 0), 2)


def _table(regions: list[tuple[int, int, int, int]], count: int | None = None) -> bytes:
    head = vu.MEM_TABLE_HEAD.pack(len(regions) if count is None else count, 0)
    return head + b"".join(vu.MEM_REGION.pack(*r) for r in regions)


def test_mem_table_parses_regions() -> None:
    regions = [(0, 0xA0000, 0x7F00_0000_0000, 0), (0xC0000, 0x3FF40000, 0x7F00_000C_0000, 0xC0000)]
    parsed = vu.parse_mem_table(_table(regions), 2)
    assert [
        (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in parsed
    ] == (regions)


def test_mem_table_bounds() -> None:
    region = (0, 4096, 0, 0)
    with pytest.raises(ProtocolError, match="too short"):
        vu.parse_mem_table(b"\0" * 7, 0)
    with pytest.raises(ProtocolError, match="region count 9"):
        vu.parse_mem_table(_table([region] * 9), 9)
    with pytest.raises(ProtocolError, match="region count 2"):  # says 2, carries 1
        vu.parse_mem_table(_table([region], count=2), 2)
    with pytest.raises(ProtocolError, match="1 regions but 0 fds"):
        vu.parse_mem_table(_table([region]), 0)
    with pytest.raises(ProtocolError, match="1 regions but 2 fds"):
        vu.parse_mem_table(_table([region]), 2)
    assert vu.parse_mem_table(_table([]), 0) == []


def test_message_fd_handling() -> None:
    msg = Message(Request.SET_VRING_KICK, vu.FLAG_VERSION | vu.FLAG_NEED_REPLY, b"", [])
    assert msg.need_reply
    assert msg.take_fd() is None


# ---------------------------------------------------------------------- session guard
class FakeFrontEnd:
    """Records what the session sends back (stands in for QEMU's socket)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, bytes]] = []

    def sendall(self, data: bytes) -> None:
        request, flags, size = vu.HEADER.unpack_from(data)
        self.sent.append((request, flags, data[vu.HEADER.size :]))
        assert len(data) == vu.HEADER.size + size


def _session(
    state: SessionState, *, reply_ack: bool = True
) -> tuple[VhostUserSession, FakeFrontEnd]:
    session = VhostUserSession()
    front = FakeFrontEnd()
    session.state = state
    session._conn = front  # type: ignore[assignment]
    session._features = 0
    session._protocol_features = vu.PF_REPLY_ACK if reply_ack else 0
    session.guest_cid = 0x1234
    session.rings = [Virtqueue(0, writable=True), Virtqueue(1, writable=False)]
    return session, front


def _msg(request: int, payload: bytes = b"", *, need_reply: bool = False) -> Message:
    flags = vu.FLAG_VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
    return Message(request, flags, payload, [])


def test_queries_are_answered_before_set_owner() -> None:
    session, front = _session(SessionState.CONNECTED)
    session._dispatch(_msg(Request.GET_FEATURES))
    session._dispatch(_msg(Request.GET_PROTOCOL_FEATURES))
    session._dispatch(_msg(Request.GET_QUEUE_NUM))
    # A reply's flags are exactly VERSION | REPLY and its request the one answered.
    assert front.sent == [
        (Request.GET_FEATURES, 0x5, vu.U64.pack(0x1_4000_0000)),
        (Request.GET_PROTOCOL_FEATURES, 0x5, vu.U64.pack(0x209)),
        (Request.GET_QUEUE_NUM, 0x5, vu.U64.pack(2)),
    ]


@pytest.mark.parametrize(
    "request_",
    [Request.SET_MEM_TABLE, Request.SET_VRING_NUM, Request.SET_VRING_KICK, Request.SET_FEATURES],
)
def test_memory_and_ring_requests_need_set_owner(request_: Request) -> None:
    session, front = _session(SessionState.CONNECTED)
    with pytest.raises(StateError, match="needs") as info:
        session._dispatch(_msg(request_, vu.VRING_STATE.pack(0, 128)))
    assert isinstance(info.value, ProtocolError)
    assert info.value.state is SessionState.CONNECTED
    assert front.sent == []


def test_set_owner_moves_to_owned_then_rings_are_accepted() -> None:
    session, _ = _session(SessionState.CONNECTED)
    session._dispatch(_msg(Request.SET_OWNER))
    assert session.state is SessionState.OWNED
    session._dispatch(_msg(Request.SET_VRING_NUM, vu.VRING_STATE.pack(1, 256)))
    assert session.rings[1].num == 256


@pytest.mark.parametrize("num", [0, 3, 100, 65536])
def test_bad_queue_sizes_are_refused(num: int) -> None:
    session, _ = _session(SessionState.OWNED)
    with pytest.raises(ProtocolError):
        session._dispatch(_msg(Request.SET_VRING_NUM, vu.VRING_STATE.pack(0, num)))


def test_bad_vring_index_in_fd_message() -> None:
    session, _ = _session(SessionState.OWNED)
    with pytest.raises(ProtocolError, match="index 2"):
        session._dispatch(_msg(Request.SET_VRING_CALL, vu.U64.pack(2 | vu.VRING_NOFD_MASK)))
    with pytest.raises(ProtocolError, match="without an fd"):
        session._dispatch(_msg(Request.SET_VRING_CALL, vu.U64.pack(0)))


def test_unknown_request_is_a_protocol_error() -> None:
    session, _ = _session(SessionState.OWNED)
    with pytest.raises(ProtocolError, match="unsupported"):
        session._dispatch(_msg(999))
    with pytest.raises(ProtocolError, match="unsupported"):
        session._dispatch(_msg(Request.SET_LOG_BASE))


def test_reply_ack_only_when_asked_and_negotiated() -> None:
    session, front = _session(SessionState.OWNED)
    session._dispatch(_msg(Request.SET_VRING_BASE, vu.VRING_STATE.pack(0, 7), need_reply=True))
    assert front.sent == [(Request.SET_VRING_BASE, 0x5, vu.U64.pack(0))]
    session._dispatch(_msg(Request.SET_VRING_BASE, vu.VRING_STATE.pack(0, 8)))
    assert len(front.sent) == 1
    quiet, front = _session(SessionState.OWNED, reply_ack=False)
    quiet._dispatch(_msg(Request.SET_VRING_BASE, vu.VRING_STATE.pack(0, 7), need_reply=True))
    assert front.sent == []


def test_set_vring_base_is_a_16_bit_index() -> None:
    session, _ = _session(SessionState.OWNED)
    with pytest.raises(ProtocolError, match="out of range"):
        session._dispatch(_msg(Request.SET_VRING_BASE, vu.VRING_STATE.pack(0, 0x10000)))


def test_get_config_returns_le64_guest_cid() -> None:
    session, front = _session(SessionState.CONNECTED)
    session._dispatch(_msg(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 8, 0) + bytes(8)))
    [(request, flags, payload)] = front.sent
    assert (request, flags, len(payload)) == (Request.GET_CONFIG, 0x5, 20)
    assert payload[12:] == (0x1234).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="too large"):
        session._dispatch(_msg(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 257, 0)))
    with pytest.raises(ProtocolError, match="too short"):
        session._dispatch(_msg(Request.GET_CONFIG, b"\0" * 11))


def test_state_sets() -> None:
    assert SessionState.CONNECTED in ANY_SESSION
    assert SessionState.CONNECTED not in OWNED_SESSION
    assert SessionState.WAITING not in ANY_SESSION
    assert SessionState.RUNNING in OWNED_SESSION
