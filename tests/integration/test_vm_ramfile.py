"""Compressed guest RAM files (:mod:`vsockrpc.vm.ramfile`, zstd as a child process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vsockrpc.errors import VmError
from vsockrpc.vm.ramfile import compress, fill_memfd, save_sparse

SIZE = 64 * 4096


def guest_ram(path: Path) -> bytes:
    """A RAM image with two data pages, the rest zero (partly a hole)."""
    content = bytearray(SIZE)
    content[5 * 4096 : 5 * 4096 + 3] = b"abc"
    content[17 * 4096 + 4095] = 1
    with path.open("wb") as f:
        f.write(content[: 32 * 4096])
        f.truncate(SIZE)
    return bytes(content)


def test_a_compressed_ram_file_fills_the_memfd_with_the_same_bytes(tmp_path: Path) -> None:
    content = guest_ram(tmp_path / "ram")
    save_sparse(tmp_path / "ram", tmp_path / "ram.bin", SIZE)
    packed = compress(tmp_path / "ram.bin")
    assert packed == tmp_path / "ram.bin.zst"
    assert not (tmp_path / "ram.bin").exists()
    assert packed.stat().st_size < 4096
    fd = fill_memfd(packed, SIZE, "test-ram")
    try:
        assert os.pread(fd, SIZE + 1, 0) == content
    finally:
        os.close(fd)
    packed.write_bytes(b"not zstd")
    with pytest.raises(VmError, match=r"ram\.bin\.zst: cannot decompress"):
        fill_memfd(packed, SIZE, "test-ram")
