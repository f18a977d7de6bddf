from __future__ import annotations

import pytest

from vsockrpc.addresses import (
    VMADDR_CID_ANY,
    HybridAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from vsockrpc.cli.main import exit_status
from vsockrpc.errors import AddressError, VsockRpcError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vsock:3:9999", VsockAddress(3, 9999)),
        ("vsock:-1:9999", VsockAddress(VMADDR_CID_ANY, 9999)),
        ("vsock:any:1", VsockAddress(VMADDR_CID_ANY, 1)),
        ("vsock:4294967294:4294967295", VsockAddress(4294967294, 4294967295)),
        ("hvsock:/run/vm.vsock:9999", HybridAddress("/run/vm.vsock", 9999)),
        ("hvsock:/tmp/a:b/v.sock:52", HybridAddress("/tmp/a:b/v.sock", 52)),
        ("unix:/tmp/x.sock", UnixAddress("/tmp/x.sock")),
        ("unix:rel.sock", UnixAddress("rel.sock")),
        ("unix:///tmp/x.sock", UnixAddress("/tmp/x.sock")),
        ("unix:/", UnixAddress("/")),
        ("tcp:127.0.0.1:50051", TcpAddress("127.0.0.1", 50051)),
        ("tcp:localhost:1", TcpAddress("localhost", 1)),
        ("tcp:[::1]:50051", TcpAddress("::1", 50051)),
        ("127.0.0.1:80", TcpAddress("127.0.0.1", 80)),
        ("localhost:80", TcpAddress("localhost", 80)),
        ("[::1]:80", TcpAddress("::1", 80)),
    ],
)
def test_parse_good(text: str, expected: object) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "vsock:3:9999",
        "vsock:-1:9999",
        "hvsock:/run/v.sock:5",
        "unix:/x",
        "tcp:[::1]:5",
        "tcp:h.x:1",
    ],
)
def test_round_trip(text: str) -> None:
    addr = parse_address(text)
    assert str(addr) == text
    assert parse_address(str(addr)) == addr


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("vsock:abc:1", "CID 'abc'"),
        ("vsock:3:abc", "port 'abc'"),
        ("vsock:3:4294967296", "port 4294967296"),
        ("vsock:4294967296:1", "CID 4294967296"),
        ("vsock:4294967295:1", "CID 4294967295"),  # reserved for ANY: write -1
        ("vsock:+3:1", "CID '+3'"),
        ("vsock:-2:1", "CID '-2'"),
        ("vsock:3", "missing port"),
        ("vsock:3:", "port ''"),
        ("hvsock::9", "empty socket path"),
        ("hvsock:/x", "missing port"),
        ("hvsock:/x:-1", "port '-1'"),
        ("unix:", "empty socket path"),
        # unix://x is a URI with authority x: neither the path /x nor the relative x.
        ("unix://relative", "unix:///abs/path"),
        ("unix://tmp/x.sock", "unix://tmp/x.sock"),
        ("unix://", "unix:///abs/path"),
        ("unix:" + "a" * 200, "bytes"),
        ("tcp:host:70000", "port 70000"),
        ("tcp::80", "empty host"),
        ("tcp:::1:80", "brackets"),
        ("bogus:1:2", "unknown address scheme 'bogus'"),
        ("nohost", "bad address"),
        ("", "bad address"),
    ],
)
def test_parse_bad_names_the_part(text: str, names: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(text)
    assert names in str(info.value)
    assert isinstance(info.value, VsockRpcError)
    assert isinstance(info.value, ValueError)
    assert exit_status(info.value) == 2  # the CLI's usage-error status


def test_frozen() -> None:
    addr = VsockAddress(3, 1)
    with pytest.raises(AttributeError):
        addr.cid = 4  # type: ignore[misc]
    assert hash(addr) == hash(VsockAddress(3, 1))


def test_address_objects_pass_through() -> None:
    addr = UnixAddress("/x")
    assert parse_address(addr) is addr


def test_each_address_kind_names_its_scheme() -> None:
    for text in ("vsock:3:1", "hvsock:/x:1", "unix:/x", "tcp:h.x:1"):
        assert parse_address(text).scheme == text.partition(":")[0]
