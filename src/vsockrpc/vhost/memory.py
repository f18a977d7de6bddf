"""Guest memory: the regions QEMU shares with SET_MEM_TABLE, mapped from their memfds.

vhost-user.rst "Memory regions description": each region is ``{guest_phys_addr, memory_size,
userspace_addr, mmap_offset}`` plus one fd. We map ``mmap_offset + memory_size`` bytes of the fd
from file offset 0 (MAP_SHARED) and translate

* a guest-physical address (descriptor ``addr``) → ``mmap_offset + (gpa - guest_phys_addr)``
* a front-end virtual address (SET_VRING_ADDR) → ``mmap_offset + (uaddr - userspace_addr)``

Every translation checks that the whole ``[addr, addr + len)`` range lies in one region, with
Python integers (no wrap-around). The result is a memoryview slice of the mapping, so nothing
downstream can reach outside guest memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass

from vsockrpc.errors import ProtocolError

__all__ = ["GuestMemory", "MemoryRegion", "OutOfBounds"]

#: Regions we accept per table (vhost-user's baseline is 8 fds per message).
MAX_REGIONS = 8


class OutOfBounds(ProtocolError):
    """A guest address range falls outside every mapped region."""


@dataclass(slots=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    mapping: mmap.mmap
    view: memoryview  # the region's bytes: view[0] is guest_phys_addr

    def close(self) -> None:
        self.view.release()
        # A slice may still be referenced somewhere; then the GC unmaps it later.
        with contextlib.suppress(BufferError):
            self.mapping.close()


class GuestMemory:
    """The mapped guest memory. Not thread-safe; owned by the device loop."""

    def __init__(self) -> None:
        self.regions: list[MemoryRegion] = []

    def add_region(
        self,
        fd: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        mmap_offset: int,
    ) -> None:
        """Map one region. The fd is not kept (the mapping holds its own reference)."""
        if len(self.regions) >= MAX_REGIONS:
            raise ProtocolError("too many memory regions")
        if memory_size <= 0 or mmap_offset < 0:
            raise ProtocolError(f"bad memory region size {memory_size} offset {mmap_offset}")
        try:
            file_size = os.fstat(fd).st_size
            if mmap_offset + memory_size > file_size:
                raise ProtocolError(
                    f"memory region [{mmap_offset:#x}+{memory_size:#x}) beyond its file "
                    f"({file_size:#x} bytes)"
                )
            mapping = mmap.mmap(
                fd, mmap_offset + memory_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as err:
            raise ProtocolError(f"cannot map guest memory region: {err}") from err
        view = memoryview(mapping)[mmap_offset : mmap_offset + memory_size]
        self.regions.append(
            MemoryRegion(guest_phys_addr, memory_size, userspace_addr, mmap_offset, mapping, view)
        )

    def clear(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []

    def gpa(self, addr: int, length: int) -> memoryview:
        """The guest-physical range ``[addr, addr+length)`` as a writable memoryview."""
        for r in self.regions:
            start = addr - r.guest_phys_addr
            if start >= 0 and start + length <= r.memory_size:
                return r.view[start : start + length]
        raise OutOfBounds(f"guest range [{addr:#x}+{length:#x}) is not mapped")

    def uaddr(self, addr: int, length: int) -> memoryview:
        """The front-end virtual range ``[addr, addr+length)`` (vring addresses)."""
        for r in self.regions:
            start = addr - r.userspace_addr
            if start >= 0 and start + length <= r.memory_size:
                return r.view[start : start + length]
        raise OutOfBounds(f"front-end address range [{addr:#x}+{length:#x}) is not mapped")
