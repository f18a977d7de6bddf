"""virtio-vsock packet header (virtio spec 1.2, 5.10.6 "Device Operation"; Linux
``include/uapi/linux/virtio_vsock.h`` ``struct virtio_vsock_hdr``).

``{le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len, le16 type, le16 op,
le32 flags, le32 buf_alloc, le32 fwd_cnt}`` = 44 bytes, followed by ``len`` payload bytes.
"""

from __future__ import annotations

import enum
import struct

from vsockrpc.vsock_constants import RESERVED_GUEST_CIDS, VMADDR_CID_HOST

__all__ = [
    "HDR",
    "HDR_SIZE",
    "HOST_CID",
    "MAX_PAYLOAD",
    "SHUTDOWN_RCV",
    "SHUTDOWN_SEND",
    "TYPE_STREAM",
    "Op",
]

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size  # 44
assert HDR_SIZE == 44

#: 5.10.4 "Device configuration layout": CID 2 is the host; 0, 1 and 0xffffffff are reserved.
HOST_CID = VMADDR_CID_HOST
RESERVED_CIDS = RESERVED_GUEST_CIDS

TYPE_STREAM = 1  # VIRTIO_VSOCK_TYPE_STREAM
TYPE_SEQPACKET = 2  # not offered (VIRTIO_VSOCK_F_SEQPACKET not negotiated)

SHUTDOWN_RCV = 1  # VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE
SHUTDOWN_SEND = 2  # VIRTIO_VSOCK_SHUTDOWN_F_SEND
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

#: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest payload a packet may carry.
MAX_PAYLOAD = 64 * 1024


class Op(enum.IntEnum):
    """5.10.6 ``op`` values (VIRTIO_VSOCK_OP_*)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


def pack(  # noqa: PLR0917 - the header's fields, in the spec's order
    src_cid: int,
    dst_cid: int,
    src_port: int,
    dst_port: int,
    length: int,
    op: int,
    flags: int,
    buf_alloc: int,
    fwd_cnt: int,
) -> bytes:
    """A stream packet header."""
    return HDR.pack(
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        length,
        TYPE_STREAM,
        op,
        flags,
        buf_alloc,
        fwd_cnt & 0xFFFFFFFF,
    )
