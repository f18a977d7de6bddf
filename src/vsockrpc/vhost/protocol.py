"""vhost-user wire format: message header, request codes, feature bits, payload layouts.

Follows QEMU ``docs/interop/vhost-user.rst`` ("Message Specification"): a 12-byte header
``{u32 request, u32 flags, u32 size}`` in native byte order, then ``size`` payload bytes; file
descriptors travel as SCM_RIGHTS ancillary data on the same ``recvmsg``. The backend is the
listening side, QEMU (the "front-end") connects.

Why hand-rolled: no maintained pure-Python vhost-user library exists (libvhost-user is C,
rust-vmm's ``vhost`` crate is Rust); the protocol subset a vsock device needs is small.
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass, field

from vsockrpc.errors import ProtocolError
from vsockrpc.vhost.paths import close_fds

__all__ = [
    "HEADER",
    "MAX_PAYLOAD",
    "MemRegion",
    "Message",
    "Request",
    "parse_header",
    "parse_mem_table",
    "parse_u64",
    "parse_vring_addr",
    "parse_vring_state",
    "recv_message",
    "send_reply",
]

HEADER = struct.Struct("=III")
#: Largest payload we accept: SET_MEM_TABLE with 8 regions is 8 + 8 * 32 = 264 bytes; GET_CONFIG
#: carries at most 256 config bytes. Anything larger is a broken or hostile front-end.
MAX_PAYLOAD = 4096
#: vhost-user.rst: "at most 8 file descriptors" per message (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8

FLAG_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# Virtio feature bits (virtio spec 6 "Reserved Feature Bits"; vhost-user.rst).
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 1 << 32  # VIRTIO_F_VERSION_1
DEVICE_FEATURES = F_VERSION_1 | F_PROTOCOL_FEATURES

# Protocol feature bits (vhost-user.rst "Protocol features").
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_CONFIG = 1 << 9  # mandatory for vhost-user-vsock: the CID comes from GET_CONFIG
PROTOCOL_FEATURES = PF_MQ | PF_REPLY_ACK | PF_CONFIG

#: Memory regions per SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS: one fd each).
MAX_REGIONS = 8

#: vring index in bits 0-7 of SET_VRING_KICK/CALL/ERR; bit 8 says "no fd, poll instead".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class Request(enum.IntEnum):
    """Front-end → back-end request codes (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25


# Payload layouts (all native endian, like the header).
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")  # {u32 index, u32 num}
#: {u32 index, u32 flags, u64 descriptor, u64 used, u64 available, u64 log} - note the order.
VRING_ADDR = struct.Struct("=IIQQQQ")
MEM_TABLE_HEAD = struct.Struct("=II")  # {u32 nregions, u32 padding}
#: {u64 guest_phys_addr, u64 memory_size, u64 userspace_addr, u64 mmap_offset}
MEM_REGION = struct.Struct("=QQQQ")
CONFIG_HEAD = struct.Struct("=III")  # {u32 offset, u32 size, u32 flags}


@dataclass(slots=True)
class Message:
    """One vhost-user message as received. ``fds`` are owned by the receiver: close what you
    don't keep (see :meth:`close_fds`)."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fd(self) -> int | None:
        """Remove and return the first fd, or None."""
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds.clear()


# ---------------------------------------------------------------------- payload parsing
# Pure functions over received bytes: every size is checked before unpacking, so a short,
# long or hostile payload is a ProtocolError, never a struct.error or a misread field.


def parse_header(data: bytes) -> tuple[int, int, int]:
    """``(request, flags, size)`` of a 12-byte header; ``size`` bounded by MAX_PAYLOAD."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"vhost-user header is {len(data)} bytes, expected {HEADER.size}")
    request, flags, size = HEADER.unpack(data)
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"vhost-user message {request} too large: {size} bytes")
    return request, flags, size


def parse_u64(payload: bytes) -> int:
    if len(payload) != U64.size:
        raise ProtocolError(f"expected a u64 payload, got {len(payload)} bytes")
    value: int = U64.unpack(payload)[0]
    return value


def parse_vring_state(payload: bytes, num_queues: int) -> tuple[int, int]:
    """``{u32 index, u32 num}`` with ``index < num_queues``."""
    if len(payload) != VRING_STATE.size:
        raise ProtocolError(f"vring state message has {len(payload)} bytes, expected 8")
    index, num = VRING_STATE.unpack(payload)
    check_vring_index(index, num_queues)
    return index, num


def parse_vring_addr(payload: bytes, num_queues: int) -> tuple[int, int, int, int]:
    """SET_VRING_ADDR → ``(index, desc, used, avail)`` (front-end virtual addresses)."""
    if len(payload) != VRING_ADDR.size:
        raise ProtocolError(f"SET_VRING_ADDR has {len(payload)} bytes, expected 40")
    index, _flags, desc, used, avail, _log = VRING_ADDR.unpack(payload)
    check_vring_index(index, num_queues)
    return index, desc, used, avail


def check_vring_index(index: int, num_queues: int) -> None:
    if not 0 <= index < num_queues:
        raise ProtocolError(f"vring index {index} out of range")


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One SET_MEM_TABLE region (vhost-user.rst "Memory regions description")."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


def parse_mem_table(payload: bytes, nfds: int) -> list[MemRegion]:
    """``{u32 nregions, u32 padding}`` + nregions regions, one fd each (``nfds`` received)."""
    if len(payload) < MEM_TABLE_HEAD.size:
        raise ProtocolError("SET_MEM_TABLE too short")
    (count, _pad) = MEM_TABLE_HEAD.unpack_from(payload)
    if count > MAX_REGIONS or len(payload) < MEM_TABLE_HEAD.size + count * MEM_REGION.size:
        raise ProtocolError(f"SET_MEM_TABLE: bad region count {count}")
    if nfds != count:
        raise ProtocolError(f"SET_MEM_TABLE: {count} regions but {nfds} fds")
    return [
        MemRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
        for i in range(count)
    ]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise EOFError("vhost-user peer closed mid-message")
        chunks += chunk
    return bytes(chunks)


def recv_message(sock: socket.socket) -> Message:
    """Read one message (blocking socket). Raises EOFError on a clean close, ProtocolError on a
    malformed header. Received fds are returned even for bad messages' callers to close."""
    data, fd_list, msg_flags, _ = socket.recv_fds(
        sock, HEADER.size, MAX_FDS, socket.MSG_CMSG_CLOEXEC
    )
    if not data:
        close_fds(fd_list)
        raise EOFError("vhost-user peer closed")
    try:
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("vhost-user message carried more than 8 file descriptors")
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        request, flags, size = parse_header(data)
        payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        close_fds(fd_list)
        raise
    return Message(request, flags, payload, fd_list)


def send_reply(sock: socket.socket, request: int, payload: bytes) -> None:
    """Send a reply: flags exactly VERSION | REPLY (vhost-user.rst "Header": bit 2 = reply)."""
    sock.sendall(HEADER.pack(request, FLAG_VERSION | FLAG_REPLY, len(payload)) + payload)


def send_message(
    sock: socket.socket,
    request: int,
    payload: bytes = b"",
    fds: list[int] | None = None,
    *,
    need_reply: bool = False,
) -> None:
    """Send a front-end request (used by the test driver, which plays QEMU)."""
    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    data = HEADER.pack(request, flags, len(payload)) + payload
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)
