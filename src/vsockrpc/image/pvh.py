"""The kernel as an uncompressed ELF with a PVH entry point, for a faster boot under TCG.

QEMU boots an ELF ``-kernel`` that carries a ``XEN_ELFNOTE_PHYS32_ENTRY`` note straight at that
32-bit entry (its ``pvh.bin`` option ROM), skipping the bzImage path: real-mode setup code, the
in-guest decompressor and the KASLR relocation pass. Under TCG that path costs ~0.6 s (measured
in docs/system.md), while the host decompresses the payload once per image build.

The payload is located with the boot protocol header (Documentation/arch/x86/boot.rst:
``setup_sects`` at 0x1f1, ``payload_offset``/``payload_length`` at 0x248/0x24c, protocol
>= 2.08) and decompressed with the tool for its format: gzip and xz through the standard
library, lz4 and zstd (no stdlib module) through their command-line tools. When a tool is
missing or the result has no PVH note, there is simply no PVH kernel and the bzImage is used.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

__all__ = ["XEN_ELFNOTE_PHYS32_ENTRY", "extract_pvh_kernel", "has_pvh_note", "payload_of"]

XEN_ELFNOTE_PHYS32_ENTRY = 18  # include/xen/interface/elfnote.h
_MAGICS = (  # (magic, format) — the compressors the kernel's decompressor knows
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),  # lz4 legacy frame (what kbuild's lz4 -l writes)
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
_TOOLS = {"lz4": ["lz4", "-dc"], "zstd": ["zstd", "-dcq"]}


def payload_of(bzimage: bytes) -> tuple[str, bytes] | None:
    """The compressed kernel inside a bzImage and its format, or None if not recognised."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    for magic, fmt in _MAGICS:
        if payload.startswith(magic):
            return fmt, payload
    return None


def _decompress(fmt: str, payload: bytes) -> bytes | None:
    if fmt == "gzip":
        return gzip.decompress(payload)
    if fmt == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    argv = _TOOLS[fmt]
    if shutil.which(argv[0]) is None:
        return None
    # The kernel build appends the uncompressed size (4 bytes) after the stream; the tools stop
    # at the end of the stream and leave those bytes alone.
    done = subprocess.run(argv, input=payload, capture_output=True, check=False)
    return done.stdout if done.stdout.startswith(b"\x7fELF") else None


def has_pvh_note(elf: bytes) -> bool:
    """True for a 64-bit little-endian ELF with a Xen PHYS32_ENTRY note in a PT_NOTE segment."""
    if not elf.startswith(b"\x7fELF\x02\x01"):
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_pvh_kernel(bzimage: Path, out: Path) -> bool:
    """Write the PVH-bootable ELF inside ``bzimage`` to ``out``; False (nothing written) if the
    kernel has none or its compressor's tool is missing."""
    found = payload_of(bzimage.read_bytes())
    if found is None:
        return False
    elf = _decompress(*found)
    if elf is None or not has_pvh_note(elf):
        return False
    out.write_bytes(elf)
    return True
