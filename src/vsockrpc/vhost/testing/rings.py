"""The guest's side of memory and split rings for the test driver: a memfd laid out in QEMU
7.2's two regions, descriptor tables, avail/used rings and buffers placed like a guest kernel
would, and the driver-side ring operations (post, kick, reap). Virtio 1.2 2.7, driver side."""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import struct
from collections import deque

from vsockrpc.errors import DeviceError
from vsockrpc.vhost.packet import HDR_SIZE, MAX_PAYLOAD

__all__ = ["FAKE_UADDR", "HIGH_START", "LOW_END", "DriverRings", "RxLayout"]

U16 = struct.Struct("<H")
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
DESC_F_NEXT, DESC_F_WRITE = 1, 2

#: QEMU's low region ends below the VGA hole; the rest starts at 0xc0000 (as observed).
LOW_END = 0xA0000
HIGH_START = 0xC0000
FAKE_UADDR = 0x7F00_0000_0000  # "QEMU virtual address" of the memfd's first byte


class RxLayout(enum.Enum):
    """How rx buffers are posted: Linux ≥ 6.3 / 6.1 Debian posts one buffer with header and
    payload together; older kernels post a [44][payload] pair."""

    SINGLE = "single"
    SPLIT = "split"


class DriverRings:
    """Guest memory and the two rings (0 = rx, 1 = tx) as the guest driver owns them."""

    def _init_memory(
        self, mem_size: int, queue_size: int, rx_buf_size: int, rx_layout: RxLayout
    ) -> None:
        self.num = queue_size
        self.rx_buf_size = rx_buf_size
        self.rx_layout = rx_layout
        self.mem_size = mem_size
        self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size)
        self._mmap = mmap.mmap(self.memfd, mem_size)
        self.mem = memoryview(self._mmap)  # raw guest memory: gpa == offset here
        self._brk = HIGH_START
        try:
            self._layout()
        except DeviceError:  # memory too small: nothing else is open yet
            self.mem.release()
            self._mmap.close()
            os.close(self.memfd)
            raise
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.err = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]

    def _close_memory(self) -> None:
        for fd in (*self.kick, *self.call, *self.err):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kick = self.call = self.err = []
        for view in (*self._avail_idx_view, *self._used_idx_view):
            view.release()
        self.mem.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()
        with contextlib.suppress(OSError):
            os.close(self.memfd)

    def _alloc(self, size: int, align: int = 4096) -> int:
        addr = (self._brk + align - 1) // align * align
        self._brk = addr + size
        if self._brk > self.mem_size:
            raise DeviceError("test guest memory too small for this layout")
        return addr

    def _layout(self) -> None:
        num = self.num
        self._brk = HIGH_START
        self.desc = [self._alloc(16 * num) for _ in range(2)]
        self.avail = [self._alloc(6 + 2 * num) for _ in range(2)]
        self.used = [self._alloc(6 + 8 * num) for _ in range(2)]
        per_rx = 2 if self.rx_layout is RxLayout.SPLIT else 1
        self.rx_slots = num // per_rx
        self.rx_bufs = [self._alloc(self.rx_buf_size, 64) for _ in range(self.rx_slots)]
        self.tx_slots = num // 2  # [44][payload] pairs like Linux
        self.tx_bufs = [self._alloc(HDR_SIZE + MAX_PAYLOAD, 64) for _ in range(self.tx_slots)]
        self.tx_free: deque[int] = deque(range(self.tx_slots))
        self.avail_idx = [0, 0]
        self.last_used_idx = [0, 0]
        # avail.idx / used.idx as single native u16s: the device reads avail.idx while we write
        # it, so it is published with one 16-bit store; struct.pack_into zero-fills its target
        # first and the device once saw avail.idx == 0 (→ "more than num ahead", ring broken,
        # every connection reset). See vsockrpc.vhost.virtqueue for the device side.
        self._avail_idx_view = [self.mem[a + 2 : a + 4].cast("H") for a in self.avail]
        self._used_idx_view = [self.mem[u + 2 : u + 4].cast("H") for u in self.used]

    def _reset_rings(self) -> None:
        for q in range(2):
            self.mem[self.avail[q] : self.avail[q] + 6 + 2 * self.num] = bytes(6 + 2 * self.num)
            self.mem[self.used[q] : self.used[q] + 6 + 8 * self.num] = bytes(6 + 8 * self.num)
        self.tx_free = deque(range(self.tx_slots))
        self.avail_idx = [0, 0]
        self.last_used_idx = [0, 0]

    def _avail_push(self, q: int, head: int) -> None:
        base = self.avail[q]
        U16.pack_into(self.mem, base + 4 + 2 * (self.avail_idx[q] % self.num), head)
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        self._avail_idx_view[q][0] = self.avail_idx[q]  # 2.7.13.3: idx after the entry, 1 store

    def post_rx(self, slots: list[int] | None = None) -> None:
        """Post rx buffers (all by default) without kicking."""
        d = self.desc[0]
        for slot in range(self.rx_slots) if slots is None else slots:
            addr = self.rx_bufs[slot]
            if self.rx_layout is RxLayout.SINGLE:
                DESC.pack_into(self.mem, d + 16 * slot, addr, self.rx_buf_size, DESC_F_WRITE, 0)
                self._avail_push(0, slot)
            else:
                i = 2 * slot
                DESC.pack_into(
                    self.mem, d + 16 * i, addr, HDR_SIZE, DESC_F_WRITE | DESC_F_NEXT, i + 1
                )
                DESC.pack_into(
                    self.mem,
                    d + 16 * (i + 1),
                    addr + HDR_SIZE,
                    self.rx_buf_size - HDR_SIZE,
                    DESC_F_WRITE,
                    0,
                )
                self._avail_push(0, i)

    def set_avail_flags(self, q: int, flags: int) -> None:
        """Write ``avail.flags`` of queue ``q`` (one 16-bit store). 2.7.6: bit 0,
        VIRTQ_AVAIL_F_NO_INTERRUPT, asks the device not to notify us of used buffers, as Linux
        does while it drains a ring."""
        self.mem[self.avail[q] : self.avail[q] + 2].cast("H")[0] = flags

    def kick_queue(self, q: int) -> None:
        os.eventfd_write(self.kick[q], 1)

    def err_signalled(self, q: int) -> bool:
        try:
            return os.eventfd_read(self.err[q]) > 0
        except BlockingIOError:
            return False

    def _tx_packet(
        self, hdr: bytes, payload: memoryview | bytes = b"", split_header: int | None = None
    ) -> bool:
        if not self.tx_free:
            return False
        slot = self.tx_free.popleft()
        addr = self.tx_bufs[slot]
        self.mem[addr : addr + HDR_SIZE] = hdr
        i = 2 * slot
        d = self.desc[1]
        if split_header is not None:  # [hdr[:k]] [hdr[k:] + payload]: an unusual but legal layout
            end = addr + HDR_SIZE + len(payload)
            self.mem[addr + HDR_SIZE : end] = payload
            DESC.pack_into(self.mem, d + 16 * i, addr, split_header, DESC_F_NEXT, i + 1)
            DESC.pack_into(
                self.mem, d + 16 * (i + 1), addr + split_header, end - addr - split_header, 0, 0
            )
        elif payload:
            self.mem[addr + HDR_SIZE : addr + HDR_SIZE + len(payload)] = payload
            DESC.pack_into(self.mem, d + 16 * i, addr, HDR_SIZE, DESC_F_NEXT, i + 1)
            DESC.pack_into(self.mem, d + 16 * (i + 1), addr + HDR_SIZE, len(payload), 0, 0)
        else:
            DESC.pack_into(self.mem, d + 16 * i, addr, HDR_SIZE, 0, 0)
        self._avail_push(1, i)
        return True

    def _used_idx(self, q: int) -> int:
        """Read used.idx once; like a guest driver, refuse a device that publishes entries it
        was never given (Linux marks such a ring broken: "id is not a head")."""
        idx: int = self._used_idx_view[q][0]
        ahead = (idx - self.last_used_idx[q]) & 0xFFFF
        if ahead > self.num:
            raise DeviceError(
                f"vring {q}: device published used.idx {idx}, {ahead} entries past "
                f"{self.last_used_idx[q]} (queue size {self.num})"
            )
        return idx

    def _reap_tx(self) -> None:
        used = self.used[1]
        idx = self._used_idx(1)
        while self.last_used_idx[1] != idx:
            head, _ = USED_ELEM.unpack_from(
                self.mem, used + 4 + 8 * (self.last_used_idx[1] % self.num)
            )
            self.last_used_idx[1] = (self.last_used_idx[1] + 1) & 0xFFFF
            self.tx_free.append(head // 2)
