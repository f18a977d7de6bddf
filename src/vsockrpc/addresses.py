"""One address grammar for every command and API.

=============================  ===========================================================
form                           meaning
=============================  ===========================================================
``vsock:CID:PORT``             AF_VSOCK. ``CID`` is 0..2**32-1, or ``-1`` / ``any`` for
                               VMADDR_CID_ANY (listening only). ``PORT`` is 0..2**32-1.
``hvsock:PATH:PORT``           hybrid vsock: the host-side Unix socket of a Firecracker /
                               Cloud Hypervisor / vhost-user-vsock device, plus the guest
                               port sent as ``CONNECT PORT``. ``PATH`` may hold colons;
                               the last colon separates the port.
``unix:PATH``                  a Unix stream socket; gRPC's URI form ``unix:///abs/path`` is
                               accepted too (``/abs/path``), ``unix://x`` (an authority) is not.
``tcp:HOST:PORT``, ``HOST:PORT``  TCP; IPv6 hosts in brackets: ``tcp:[::1]:50051``.
=============================  ===========================================================

Every malformed input raises :class:`vsockrpc.errors.AddressError` naming the bad part.
Each dataclass carries its ``scheme`` (a class attribute); what an address kind *does*
(connect, listen, how grpcio reaches it) lives in :mod:`vsockrpc.transport`, one module per kind.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

from vsockrpc.errors import AddressError
from vsockrpc.vsock_constants import VMADDR_CID_ANY, VMADDR_CID_HOST

__all__ = [
    "SUN_PATH_MAX",
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "Address",
    "HybridAddress",
    "Scheme",
    "TcpAddress",
    "UnixAddress",
    "VsockAddress",
    "parse_address",
]

Scheme = Literal["vsock", "hvsock", "unix", "tcp"]

_U32_MAX = 0xFFFFFFFF
# sun_path is 108 bytes including the terminating NUL (unix(7)).
SUN_PATH_MAX = 107


@dataclass(frozen=True, slots=True)
class VsockAddress:
    """AF_VSOCK endpoint ``cid:port``; ``cid == VMADDR_CID_ANY`` means any (listen only)."""

    scheme: ClassVar[Literal["vsock"]] = "vsock"
    cid: int
    port: int

    @property
    def is_any(self) -> bool:
        return self.cid == VMADDR_CID_ANY

    def sockaddr(self) -> tuple[int, int]:
        return (self.cid, self.port)

    def __str__(self) -> str:
        return f"vsock:{'-1' if self.is_any else self.cid}:{self.port}"


@dataclass(frozen=True, slots=True)
class HybridAddress:
    """A guest ``port`` reached through a hybrid-vsock Unix socket at ``path``."""

    scheme: ClassVar[Literal["hvsock"]] = "hvsock"
    path: str
    port: int

    def __str__(self) -> str:
        return f"hvsock:{self.path}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A Unix stream socket at ``path``."""

    scheme: ClassVar[Literal["unix"]] = "unix"
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """TCP ``host:port`` (IPv6 hosts without brackets)."""

    scheme: ClassVar[Literal["tcp"]] = "tcp"
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


Address = VsockAddress | HybridAddress | UnixAddress | TcpAddress


def _parse_int(text: str, what: str, lo: int, hi: int, whole: str) -> int:
    # int() accepts "+5", " 5" and "5_0"; an address does not.
    if not text or not (text.isascii() and text.isdigit()):
        raise AddressError(f"bad {what} {text!r} in address {whole!r}: expected a number")
    value = int(text)
    if not lo <= value <= hi:
        raise AddressError(f"{what} {value} out of range {lo}..{hi} in address {whole!r}")
    return value


def _parse_path(text: str, whole: str) -> str:
    if not text:
        raise AddressError(f"empty socket path in address {whole!r}")
    if "\0" in text:
        raise AddressError(f"NUL byte in socket path of address {whole!r}")
    if len(text.encode()) > SUN_PATH_MAX:
        raise AddressError(
            f"socket path of {whole!r} is {len(text.encode())} bytes; Unix sockets allow "
            f"{SUN_PATH_MAX}"
        )
    return text


def _parse_vsock(rest: str, whole: str) -> VsockAddress:
    cid_text, sep, port_text = rest.partition(":")
    if not sep:
        raise AddressError(f"missing port in {whole!r}: expected vsock:CID:PORT")
    if cid_text in ("-1", "any"):
        cid = VMADDR_CID_ANY
    else:
        cid = _parse_int(cid_text, "CID", 0, _U32_MAX - 1, whole)
    return VsockAddress(cid, _parse_int(port_text, "port", 0, _U32_MAX, whole))


def _parse_hybrid(rest: str, whole: str) -> HybridAddress:
    path, sep, port_text = rest.rpartition(":")
    if not sep:
        raise AddressError(f"missing port in {whole!r}: expected hvsock:PATH:PORT")
    return HybridAddress(
        _parse_path(path, whole), _parse_int(port_text, "port", 0, _U32_MAX, whole)
    )


def _parse_unix(rest: str, whole: str) -> UnixAddress:
    if rest.startswith("//"):  # URI form: an empty authority, then the absolute path
        if not rest.startswith("///"):
            raise AddressError(
                f"bad address {whole!r}: unix:// takes an absolute path (unix:///abs/path); "
                "use unix:PATH for a relative one"
            )
        rest = rest[2:]
    return UnixAddress(_parse_path(rest, whole))


def _parse_tcp(rest: str, whole: str) -> TcpAddress:
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise AddressError(f"bad IPv6 host in {whole!r}: expected [HOST]:PORT")
        port_text = tail[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise AddressError(f"missing port in {whole!r}: expected HOST:PORT")
        if ":" in host:
            raise AddressError(f"IPv6 host in {whole!r} must be in brackets: [HOST]:PORT")
    if not host:
        raise AddressError(f"empty host in address {whole!r}")
    return TcpAddress(host, _parse_int(port_text, "port", 0, 65535, whole))


_SCHEMES: dict[str, Callable[[str, str], Address]] = {
    "vsock": _parse_vsock,
    "hvsock": _parse_hybrid,
    "unix": _parse_unix,
    "tcp": _parse_tcp,
}


def parse_address(text: str | Address) -> Address:
    """Parse ``text`` into one of the address dataclasses (an address passes through)."""
    if not isinstance(text, str):
        return text
    if text.startswith("["):  # bare [v6]:PORT
        return _parse_tcp(text, text)
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise AddressError(
            f"bad address {text!r}: expected vsock:CID:PORT, hvsock:PATH:PORT, unix:PATH "
            "or [tcp:]HOST:PORT"
        )
    parser = _SCHEMES.get(scheme)
    if parser is not None:
        return parser(rest, text)
    # No known scheme: HOST:PORT (the only schemeless form) when the head is "localhost", an
    # IPv4 address or a dotted DNS name; a bare single-label name needs tcp: to be unambiguous.
    if scheme and (scheme == "localhost" or _looks_like_host(scheme)) and ":" not in rest:
        return _parse_tcp(text, text)
    raise AddressError(
        f"unknown address scheme {scheme!r} in {text!r}: use vsock:, hvsock:, unix: or tcp:"
    )


def _looks_like_host(text: str) -> bool:
    try:
        socket.inet_aton(text)
        return True
    except OSError:
        pass
    # A DNS name: has a dot, labels of [A-Za-z0-9-].
    labels = text.split(".")
    return len(labels) > 1 and all(
        label and all(c.isascii() and (c.isalnum() or c == "-") for c in label) for label in labels
    )
