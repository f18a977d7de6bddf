"""Guest RAM files (:mod:`vsockrpc.vm.ramfile`): sparse saving, memfd filling, finding QEMU's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vsockrpc.errors import VmError
from vsockrpc.vm.ramfile import RamFill, fill_memfd, find_guest_ram, save_sparse

SIZE = 64 * 4096


def guest_ram(path: Path) -> bytes:
    """A RAM image: written zero pages, two data pages, a never-written tail (a hole)."""
    content = bytearray(SIZE)
    content[5 * 4096 : 5 * 4096 + 3] = b"abc"
    content[17 * 4096 + 4095] = 1
    with path.open("wb") as f:
        f.write(content[: 32 * 4096])  # pages 0-31 written, mostly zeros
        f.truncate(SIZE)
    return bytes(content)


def test_save_sparse_writes_only_pages_that_are_not_zero(tmp_path: Path) -> None:
    content = guest_ram(tmp_path / "ram")
    written = save_sparse(tmp_path / "ram", tmp_path / "ram.bin", SIZE)
    assert written == 2 * 4096
    assert (tmp_path / "ram.bin").read_bytes() == content
    assert (tmp_path / "ram.bin").stat().st_blocks * 512 <= 4 * 4096  # holes elsewhere
    with pytest.raises(VmError, match="File exists"):  # never overwrites
        save_sparse(tmp_path / "ram", tmp_path / "ram.bin", SIZE)


def test_fill_memfd_holds_the_file_and_is_found_by_size(tmp_path: Path) -> None:
    content = guest_ram(tmp_path / "ram")
    save_sparse(tmp_path / "ram", tmp_path / "ram.bin", SIZE)
    fd = fill_memfd(tmp_path / "ram.bin", SIZE, "test-ram")
    try:
        assert os.get_inheritable(fd)
        assert os.pread(fd, SIZE + 1, 0) == content
        found = find_guest_ram(os.getpid(), SIZE)
        assert os.path.samefile(found, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    with pytest.raises(VmError, match="holds no memfd of 12288 bytes"):
        find_guest_ram(os.getpid(), 3 * 4096)


def test_ram_fill_fills_in_the_background_and_reports_a_failure(tmp_path: Path) -> None:
    content = guest_ram(tmp_path / "ram")
    save_sparse(tmp_path / "ram", tmp_path / "ram.bin", SIZE)
    ram = RamFill()
    ram.start_fill(tmp_path / "ram.bin", SIZE, "test-ram")
    assert ram.fd is not None
    fd = ram.fd
    ram.wait_filled()
    assert os.pread(fd, SIZE + 1, 0) == content
    ram.close()
    assert ram.fd is None
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    broken = RamFill()
    broken.start_fill(tmp_path / "absent.bin", SIZE, "test-ram")
    with pytest.raises(VmError, match="cannot copy the snapshot's guest RAM"):
        broken.wait_filled()
    broken.close()
