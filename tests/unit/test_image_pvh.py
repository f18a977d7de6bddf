"""The PVH kernel extraction (image/pvh.py) on synthetic bzImages and ELFs."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from vsockrpc.image import pvh


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _note(name: bytes, n_type: int, desc: bytes) -> bytes:
    name += b"\0"
    return struct.pack("<III", len(name), len(desc), n_type) + _pad(name) + _pad(desc)


def _elf(notes: bytes) -> bytes:
    """A minimal ELF64 (little-endian) whose only program header is a PT_NOTE over ``notes``."""
    phoff, phentsize = 64, 56
    notes_off = phoff + phentsize
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, phentsize, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 4, 4, notes_off, 0, 0, len(notes), len(notes), 4)
    return header + ph + notes


PVH_ELF = _elf(_note(b"Xen", 6, b"linux\0") + _note(b"Xen", 18, b"\0\0\0\x01"))
PLAIN_ELF = _elf(_note(b"GNU", 3, b"\x01" * 20) + _note(b"Xen", 6, b"linux\0"))


def _bzimage(payload: bytes, *, version: int = 0x20F, setup_sects: int = 2) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    offset = 16
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\xaa" * offset + payload + struct.pack("<I", 12345)


def test_pvh_note_is_found_only_where_present() -> None:
    assert pvh.has_pvh_note(PVH_ELF)
    assert not pvh.has_pvh_note(PLAIN_ELF)
    assert not pvh.has_pvh_note(b"MZ not an elf")


def test_payload_is_located_by_the_boot_header() -> None:
    compressed = gzip.compress(PVH_ELF)
    assert pvh.payload_of(_bzimage(compressed)) == ("gzip", compressed)
    assert pvh.payload_of(_bzimage(compressed, version=0x206)) is None  # no payload fields
    assert pvh.payload_of(b"\0" * 4096) is None  # no HdrS


def test_extracts_gzip_and_xz_kernels(tmp_path: Path) -> None:
    for n, compressed in enumerate((gzip.compress(PVH_ELF), lzma.compress(PVH_ELF))):
        bz = tmp_path / f"vmlinuz{n}"
        bz.write_bytes(_bzimage(compressed))
        out = tmp_path / f"vmlinux{n}"
        assert pvh.extract_pvh_kernel(bz, out)
        assert out.read_bytes() == PVH_ELF


def test_no_pvh_note_means_no_file(tmp_path: Path) -> None:
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(_bzimage(gzip.compress(PLAIN_ELF)))
    out = tmp_path / "vmlinux"
    assert not pvh.extract_pvh_kernel(bz, out)
    assert not out.exists()


def test_missing_tool_means_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no lz4 binary reachable
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(_bzimage(b"\x02\x21\x4c\x18" + b"\0" * 64))
    out = tmp_path / "vmlinux"
    assert not pvh.extract_pvh_kernel(bz, out)
    assert not out.exists()
