"""Split virtqueues (virtio spec 1.2, 2.7 "Split Virtqueues"), device side, with every index,
descriptor, length and chain a hostile guest controls validated before use.

Layout (2.7, little-endian): descriptor table ``num x {le64 addr, le32 len, le16 flags, le16
next}``; available ring ``{le16 flags, le16 idx, le16 ring[num]}``; used ring ``{le16 flags, le16
idx, {le32 id, le32 len}[num]}``. Indices run free modulo 2**16; the slot is ``idx % num``.
EVENT_IDX and INDIRECT_DESC are not negotiated, so neither ``used_event``/``avail_event`` nor
indirect tables exist here.

Memory ordering: Python has no fences. On x86 (TSO) stores become visible in program order, so
writing the used element before ``used.idx`` and signalling the call eventfd afterwards (a
syscall) is enough (2.7.8.2 "the device MUST ... update idx after ... the ring entry"). The one
place that needs a full barrier is reading ``avail.flags`` after publishing ``used.idx``
(:meth:`Virtqueue.notify`): x86 may satisfy a load before an earlier store is visible, so a lock
is taken and released between them (a locked instruction, which x86 orders both ways).

The guest reads ``used.idx`` while we write it, so it is published with one aligned 16-bit store
(an element of a ``memoryview.cast("H")``), never with ``struct.pack_into``: CPython's
``pack_into`` zero-fills its target before writing the fields, and a guest that read ``used.idx``
in that window saw it jump back to 0, i.e. ~65 000 "new" used entries (the test driver
re-delivered stale buffers, counted phantom bytes and overfilled the avail ring, which we then
took for corruption and reset every connection). Native order is little-endian (checked below),
as virtio 1.x rings are (2.7).
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
import sys
import threading
import time

from vsockrpc.errors import ProtocolError
from vsockrpc.vhost.memory import GuestMemory, OutOfBounds
from vsockrpc.vhost.paths import close_fds

__all__ = ["DESC", "Chain", "RingError", "RingState", "Virtqueue"]

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1  # 2.7.6: VIRTQ_AVAIL_F_NO_INTERRUPT, "do not notify me"

#: Taken and released as a full memory barrier (see the module docstring): CPython's lock takes
#: and releases with atomic read-modify-writes (a POSIX semaphore; PyMutex from Python 3.13).
_BARRIER = threading.Lock()

if sys.byteorder != "little":  # the 16-bit index views below are native-endian
    raise ImportError("vsockrpc.vhost needs a little-endian host (virtio rings are little-endian)")

#: Largest queue size the virtio spec allows for split rings (2.7: "Queue Size ... max 32768").
MAX_QUEUE_SIZE = 32768


class RingError(ProtocolError):
    """The guest corrupted a virtqueue: the ring is stopped and its err fd signalled."""


class RingState(enum.Enum):
    """Ring lifecycle (vhost-user.rst "Starting and stopping rings")."""

    STOPPED = "stopped"  # no kick fd yet, or stopped by GET_VRING_BASE
    STARTED = "started"  # kick fd received; waiting for SET_VRING_ENABLE 1
    ENABLED = "enabled"  # processing buffers
    BROKEN = "broken"  # guest corruption seen; err fd signalled; idle until reconfigured


#: One descriptor chain: ``(head, segments)``; each segment is a memoryview into guest memory.
Chain = tuple[int, list[memoryview]]


class Virtqueue:
    """One split virtqueue. ``writable`` is True for rx (device writes) and False for tx."""

    def __init__(self, index: int, *, writable: bool) -> None:
        self.index = index
        self.writable = writable
        self.state = RingState.STOPPED
        self.num = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0  # front-end virtual addresses
        self.last_avail_idx = 0  # next avail slot we will consume (vhost-user "base")
        self.used_idx = 0  # next used slot we will fill (mirrors used.idx once flushed)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False  # SET_VRING_ENABLE value
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._avail_idx_view: memoryview | None = None  # avail.idx as one native u16
        self._avail_flags_view: memoryview | None = None  # avail.flags as one native u16
        self._used_idx_view: memoryview | None = None  # used.idx as one native u16
        self._mem: GuestMemory | None = None
        self._avail_idx = 0  # last avail.idx we read
        self._unflushed = 0  # used entries written but not yet published in used.idx
        self._unsignaled = 0  # published entries the guest has not been signalled about
        self.unsignaled_since = 0.0
        self.signals_suppressed = 0  # notifications the guest asked us not to send

    # ----------------------------------------------------------------- configuration
    def set_num(self, num: int) -> None:
        # 2.7: queue size is a power of 2 (split rings), at most 32768.
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise ProtocolError(f"vring {self.index}: bad size {num}")
        self.num = num

    def set_fd(self, kind: str, fd: int | None) -> None:
        """Replace the kick/call/err fd (QEMU re-sends SET_VRING_CALL several times)."""
        old = getattr(self, kind)
        if old is not None and old != fd:
            close_fds([old])
        setattr(self, kind, fd)

    def map(self, mem: GuestMemory) -> None:
        """Translate the ring addresses; called on start and after every SET_MEM_TABLE."""
        if not self.num:
            raise ProtocolError(f"vring {self.index}: started before SET_VRING_NUM")
        try:
            self._desc = mem.uaddr(self.desc_addr, 16 * self.num)
            self._avail = mem.uaddr(self.avail_addr, 4 + 2 * self.num)
            self._used = mem.uaddr(self.used_addr, 4 + 8 * self.num)
        except OutOfBounds as err:
            raise RingError(f"vring {self.index}: ring outside guest memory: {err}") from err
        # Single 16-bit loads/stores for the two indices the other side touches concurrently
        # (see the module docstring: struct.pack_into would expose a transient 0).
        self._avail_idx_view = self._avail[2:4].cast("H")
        self._avail_flags_view = self._avail[0:2].cast("H")
        self._used_idx_view = self._used[2:4].cast("H")
        self._mem = mem

    def unmap(self) -> None:
        self._desc = self._avail = self._used = None
        self._avail_idx_view = self._avail_flags_view = self._used_idx_view = None
        self._mem = None

    def start(self, mem: GuestMemory) -> None:
        self.map(mem)
        self._avail_idx = self.last_avail_idx
        self.used_idx = self.last_avail_idx  # the used ring catches up with what we consume
        self._unflushed = self._unsignaled = 0
        self.state = RingState.ENABLED if self.enabled else RingState.STARTED

    def stop(self) -> int:
        """Stop (GET_VRING_BASE): publish what is pending; return last_avail_idx."""
        if self.state in (RingState.ENABLED, RingState.STARTED):
            self.flush()
        self._unsignaled = 0
        self.state = RingState.STOPPED
        self.unmap()
        return self.last_avail_idx

    def close_fds(self) -> None:
        for kind in ("kick_fd", "call_fd", "err_fd"):
            self.set_fd(kind, None)

    @property
    def ready(self) -> bool:
        return self.state is RingState.ENABLED

    # ----------------------------------------------------------------- data path
    def has_avail(self) -> bool:
        """True if the guest has posted a buffer we have not consumed (re-reads avail.idx)."""
        if self.state is not RingState.ENABLED:
            return False
        if self._avail_idx != self.last_avail_idx:
            return True
        assert self._avail_idx_view is not None
        self._avail_idx = self._avail_idx_view[0]
        return self._avail_idx != self.last_avail_idx

    def pop(self) -> Chain | None:
        """Take the next available chain, validated, or None when the ring is empty."""
        if not self.has_avail():
            return None
        avail = self._avail
        assert avail is not None and self._desc is not None and self._mem is not None
        num = self.num
        last = self.last_avail_idx
        # 2.7.13 / vhost: the guest may have posted at most num buffers ahead of us.
        if (self._avail_idx - last) & 0xFFFF > num:
            raise RingError(
                f"vring {self.index}: avail.idx {self._avail_idx} is more than {num} ahead of "
                f"{last}"
            )
        head = U16.unpack_from(avail, 4 + 2 * (last % num))[0]
        self.last_avail_idx = (last + 1) & 0xFFFF
        desc = self._desc
        gpa = self._mem.gpa
        writable = self.writable
        segments: list[memoryview] = []
        index = head
        while True:
            if index >= num:
                raise RingError(f"vring {self.index}: descriptor index {index} >= {num}")
            addr, length, flags, nxt = DESC.unpack_from(desc, 16 * index)
            if flags & DESC_F_INDIRECT:
                raise RingError(f"vring {self.index}: indirect descriptor (not negotiated)")
            # 2.7.4: rx buffers are device-writable, tx buffers device-readable.
            if bool(flags & DESC_F_WRITE) != writable:
                raise RingError(f"vring {self.index}: descriptor {index} has the wrong direction")
            try:
                segments.append(gpa(addr, length))
            except OutOfBounds as err:
                raise RingError(f"vring {self.index}: descriptor {index}: {err}") from err
            if not flags & DESC_F_NEXT:
                break
            # 2.7.5.2: a chain longer than the queue must loop.
            if len(segments) >= num:
                raise RingError(f"vring {self.index}: descriptor chain loops")
            index = nxt
        return head, segments

    def push(self, head: int, length: int) -> None:
        """Return a chain to the guest (written now, published by :meth:`flush`)."""
        used = self._used
        if used is None:
            return  # ring stopped or remapped away meanwhile: the buffer is gone with it
        USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx % self.num), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._unflushed += 1

    def flush(self, *, defer_below: int = 0) -> bool:
        """Publish pushed entries in used.idx and signal the call fd once (:meth:`notify`). True
        if a signal was due.

        ``defer_below``: publish but do not signal while fewer than that many entries await a
        signal; :meth:`notify` sends it later (the device's loop does, after a short quiet
        spell). 2.7.7.2 lets a device skip interrupts; the guest still finds the entries."""
        if self._unflushed and self._used_idx_view is not None:
            # 2.7.8.2: one store, after the entries (never struct.pack_into: it zero-fills first).
            self._used_idx_view[0] = self.used_idx
            if not self._unsignaled:
                self.unsignaled_since = time.monotonic()
            self._unsignaled += self._unflushed
            self._unflushed = 0
        if not self._unsignaled or self._unsignaled < defer_below:
            return False
        self.notify()
        return True

    @property
    def unflushed(self) -> int:
        """Entries pushed since the last :meth:`flush`."""
        return self._unflushed

    @property
    def signal_pending(self) -> bool:
        return self._unsignaled > 0

    def notify(self) -> None:
        """Signal the call fd for everything published so far, unless the guest asked for no
        notification (2.7.7.2: with ``avail.flags`` NO_INTERRUPT set, the device SHOULD NOT send
        one). Linux sets it while it drains the used ring anyway, and clears it before it looks
        for more (``virtqueue_enable_cb``, a barrier, then ``virtqueue_poll``). Our side of that
        pairing is the barrier between publishing ``used.idx`` and reading the flag: one of us
        then sees the other's store, so a skipped signal is never one the guest waits for.
        Under TCG a signal is an interrupt the vCPU must take."""
        self._unsignaled = 0
        if self.call_fd is None:
            return
        flags = self._avail_flags_view
        if flags is not None:
            with _BARRIER:
                pass
            if flags[0] & AVAIL_F_NO_INTERRUPT:
                self.signals_suppressed += 1
                return
        with contextlib.suppress(OSError):
            os.eventfd_write(self.call_fd, 1)

    def break_ring(self) -> None:
        """Corruption: stop using the ring and tell the front-end through the err fd."""
        self.state = RingState.BROKEN
        self._unflushed = 0
        if self.err_fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.err_fd, 1)
