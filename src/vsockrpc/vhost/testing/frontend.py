"""The test driver's vhost-user front-end: what QEMU 7.2 sends, in its order (GUEST-BOOT.md),
over the device's real socket: handshake, memory table and ring set-up, guest reset."""

from __future__ import annotations

import socket

from vsockrpc.errors import DeviceError
from vsockrpc.vhost import protocol as vu
from vsockrpc.vhost.protocol import Request
from vsockrpc.vhost.testing.rings import FAKE_UADDR, HIGH_START, LOW_END, DriverRings

__all__ = ["VhostFrontend"]


class VhostFrontend(DriverRings):
    """Plays QEMU towards the back-end."""

    sock: socket.socket
    config_cid: int | None
    features: int

    def _req(
        self,
        request: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        reply: bool = False,
        ack: bool = False,
    ) -> bytes:
        """Send a request; read its reply (``reply``) or REPLY_ACK (``ack``, like QEMU does for
        SET_MEM_TABLE), raising DeviceError on a non-zero ack."""
        vu.send_message(self.sock, request, payload, fds, need_reply=ack)
        if not reply and not ack:
            return b""
        data = _recv_exact(self.sock, vu.HEADER.size)
        req, flags, size = vu.HEADER.unpack(data)
        if req != request or flags != (vu.FLAG_VERSION | vu.FLAG_REPLY):
            raise DeviceError(f"bad reply to {request}: request {req} flags {flags:#x}")
        body = _recv_exact(self.sock, size)
        if ack and not reply and body != vu.U64.pack(0):
            raise DeviceError(f"request {request} failed (REPLY_ACK {body.hex()})")
        return body

    def sync(self) -> None:
        """Round-trip with the back-end (GET_FEATURES): everything sent before is processed."""
        self._req(Request.GET_FEATURES, reply=True)

    def _vring_fd(self, request: int, index: int, fd: int) -> None:
        self._req(request, vu.U64.pack(index), [fd])

    def handshake(self) -> None:
        """What QEMU 7.2 sends at start-up, before the guest driver loads."""
        features = vu.U64.unpack(self._req(Request.GET_FEATURES, reply=True))[0]
        if not features & vu.F_PROTOCOL_FEATURES:
            raise DeviceError("device lacks VHOST_USER_F_PROTOCOL_FEATURES")
        pf = vu.U64.unpack(self._req(Request.GET_PROTOCOL_FEATURES, reply=True))[0]
        self._req(Request.SET_PROTOCOL_FEATURES, vu.U64.pack(pf & vu.PROTOCOL_FEATURES))
        self.queue_num: int = vu.U64.unpack(self._req(Request.GET_QUEUE_NUM, reply=True))[0]
        self._req(Request.SET_OWNER)
        self.features = vu.U64.unpack(self._req(Request.GET_FEATURES, reply=True))[0]
        for q in range(2):
            self._vring_fd(Request.SET_VRING_CALL, q, self.call[q])
            self._vring_fd(Request.SET_VRING_ERR, q, self.err[q])
        cfg = self._req(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 8, 0) + bytes(8), reply=True)
        self.config_cid = int.from_bytes(
            cfg[vu.CONFIG_HEAD.size : vu.CONFIG_HEAD.size + 8], "little"
        )

    def start(self, *, post_rx: bool = True) -> None:
        """What QEMU sends when the guest loads vmw_vsock_virtio_transport; posts rx buffers."""
        for q in range(2):
            self._vring_fd(Request.SET_VRING_CALL, q, self.call[q])
        self._req(Request.SET_FEATURES, vu.U64.pack(self.features & vu.DEVICE_FEATURES))
        regions = [
            (0, LOW_END, FAKE_UADDR, 0),
            (HIGH_START, self.mem_size - HIGH_START, FAKE_UADDR + HIGH_START, HIGH_START),
        ]
        table = vu.MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(
            vu.MEM_REGION.pack(*r) for r in regions
        )
        self._req(Request.SET_MEM_TABLE, table, [self.memfd, self.memfd], ack=True)
        if post_rx:
            self.post_rx()
        for q in range(2):
            self._req(Request.SET_VRING_NUM, vu.VRING_STATE.pack(q, self.num))
            self._req(Request.SET_VRING_BASE, vu.VRING_STATE.pack(q, 0))
            self._req(
                Request.SET_VRING_ADDR,
                vu.VRING_ADDR.pack(
                    q,
                    0,
                    FAKE_UADDR + self.desc[q],
                    FAKE_UADDR + self.used[q],
                    FAKE_UADDR + self.avail[q],
                    0,
                ),
            )
            self._vring_fd(Request.SET_VRING_KICK, q, self.kick[q])
        for q in range(2):
            self._req(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(q, 1))
        for q in range(2):
            self._vring_fd(Request.SET_VRING_CALL, q, self.call[q])
        self.sync()

    def boot(self) -> None:
        """:meth:`handshake` then :meth:`start`."""
        self.handshake()
        self.start()

    def stop_rings(self) -> list[int]:
        """Guest reset / power-off: ENABLE 0 x2, GET_VRING_BASE x2 (replied), CALL x2."""
        for q in range(2):
            self._req(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(q, 0))
        bases = []
        for q in range(2):
            reply = self._req(Request.GET_VRING_BASE, vu.VRING_STATE.pack(q, 0), reply=True)
            bases.append(vu.VRING_STATE.unpack(reply)[1])
        for q in range(2):
            self._vring_fd(Request.SET_VRING_CALL, q, self.call[q])
        self.sync()
        return bases


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise DeviceError("vhost-user back-end closed the connection")
        buf += chunk
    return bytes(buf)
