"""End-to-end transfer checksums (``vsockrpc.agent.v1.Checksum``), computed by both sides.

The sender hashes what it sends and puts the digest in the ``TransferTrailer``; the receiver
hashes what arrived and compares. CRC-32 digests are 4 bytes big-endian.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from typing_extensions import Buffer

from vsockrpc.agent.v1 import agent_pb2 as pb

__all__ = ["CHECKSUMS", "Hasher", "checksum_name", "new_hasher"]

CHECKSUMS: Mapping[str, pb.Checksum.ValueType] = {
    "crc32": pb.CHECKSUM_CRC32,
    "sha256": pb.CHECKSUM_SHA256,
}
"""The algorithms by the name users give them."""


class Hasher(Protocol):
    def update(self, data: Buffer, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32:
    """zlib's CRC-32 behind the hashlib interface; digest is 4 bytes big-endian."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: Buffer, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


def new_hasher(checksum: pb.Checksum.ValueType) -> Hasher:
    """A fresh hasher for ``checksum``; ValueError for an unknown algorithm."""
    if checksum == pb.CHECKSUM_SHA256:
        # Imported on first use: hashlib loads OpenSSL, start-up time in a TCG guest's agent
        # that the default CRC-32 does not need.
        import hashlib

        return hashlib.sha256()
    if checksum == pb.CHECKSUM_CRC32:
        return _Crc32()
    raise ValueError(f"unknown checksum algorithm {checksum}")


def checksum_name(checksum: pb.Checksum.ValueType) -> str:
    """``"crc32"`` or ``"sha256"`` (for logs and messages)."""
    return pb.Checksum.Name(checksum).removeprefix("CHECKSUM_").lower()
