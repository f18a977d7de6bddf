"""``agent.datachannel.pipelined_copy``: both sides of a data-channel transfer overlap when there
is a second CPU, and the first failure on either side stops both, leaves no thread behind and
reaches the caller."""

from __future__ import annotations

import io
import threading
import zlib

import pytest

from vsockrpc.agent import datachannel
from vsockrpc.agent.datachannel import PIPELINE_BUFFER_SIZE, PIPELINE_BUFFERS, pipelined_copy

THREAD = "vsockrpc-datachannel"


@pytest.fixture(params=[2, 1], ids=["2 CPUs", "1 CPU"])
def cpus(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The test runs as on a machine with two CPUs (pipelined), then with one."""
    monkeypatch.setattr(datachannel, "usable_cpus", lambda: request.param)
    return int(request.param)


def helper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD]


def source_and_sink(data: bytes) -> tuple[io.BytesIO, io.BytesIO]:
    return io.BytesIO(data), io.BytesIO()


@pytest.mark.parametrize("fill_in_thread", [True, False])
@pytest.mark.parametrize("size", [0, 1, 1000, 4096, 4097, 40_000])
def test_copies_every_byte_in_order(fill_in_thread: bool, size: int, cpus: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    source, sink = source_and_sink(data)
    moved = pipelined_copy(
        source.readinto, sink.write, fill_in_thread=fill_in_thread, buffer_size=4096
    )
    assert moved == size
    assert sink.getvalue() == data
    assert not helper_threads()


@pytest.mark.parametrize("fill_in_thread", [True, False])
def test_fill_and_drain_overlap(fill_in_thread: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datachannel, "usable_cpus", lambda: 2)
    # The second fill waits until the first drain has begun, and that drain waits until the
    # second fill has begun: done one after the other, each would wait for the other forever.
    first_drain_started = threading.Event()
    second_fill_started = threading.Event()
    fills = 0

    def fill(view: memoryview) -> int:
        nonlocal fills
        fills += 1
        if fills == 2:
            second_fill_started.set()
            assert first_drain_started.wait(10), "fill ran only after the drain"
        if fills > 3:
            return 0
        view[:4] = b"abcd"
        return 4

    def drain(view: memoryview) -> None:
        first_drain_started.set()
        assert second_fill_started.wait(10), "drain ran only after the fill"

    assert pipelined_copy(fill, drain, fill_in_thread=fill_in_thread, buffer_size=16) == 12


@pytest.mark.parametrize("fill_in_thread", [True, False])
def test_buffers_are_reused(fill_in_thread: bool, cpus: int) -> None:
    seen: set[int] = set()
    left = 100

    def fill(view: memoryview) -> int:
        nonlocal left
        seen.add(id(view.obj))
        left -= 1
        return 8 if left >= 0 else 0

    pipelined_copy(fill, lambda view: None, fill_in_thread=fill_in_thread, buffer_size=8)
    assert len(seen) <= PIPELINE_BUFFERS


@pytest.mark.parametrize("fill_in_thread", [True, False])
def test_a_failing_fill_stops_the_copy_and_reaches_the_caller(
    fill_in_thread: bool, cpus: int
) -> None:
    drained: list[bytes] = []
    calls = 0

    def fill(view: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(5, "the file went away")
        view[:2] = b"ok"
        return 2

    with pytest.raises(OSError, match="the file went away"):
        pipelined_copy(fill, lambda v: drained.append(bytes(v)), fill_in_thread=fill_in_thread)
    assert calls == 3
    assert drained == [b"ok", b"ok"][: len(drained)]
    assert not helper_threads()


@pytest.mark.parametrize("fill_in_thread", [True, False])
def test_a_failing_drain_stops_the_fill(fill_in_thread: bool, cpus: int) -> None:
    fills = 0

    def fill(view: memoryview) -> int:
        nonlocal fills
        fills += 1
        view[:1] = b"x"
        return 1

    def drain(view: memoryview) -> None:
        raise BrokenPipeError(32, "the peer went away")

    with pytest.raises(BrokenPipeError, match="the peer went away"):
        pipelined_copy(fill, drain, fill_in_thread=fill_in_thread)
    # An endless source: the fill side stopped once the drain failed, within the buffers.
    assert fills <= PIPELINE_BUFFERS + 1
    assert not helper_threads()


def test_when_both_sides_fail_the_callers_error_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datachannel, "usable_cpus", lambda: 2)
    helper_failed = threading.Event()
    fills = 0

    def fill(view: memoryview) -> int:  # the caller's side: a socket
        nonlocal fills
        fills += 1
        if fills == 1:
            view[:1] = b"x"
            return 1
        assert helper_failed.wait(10)
        raise TimeoutError("the socket went quiet")

    def drain(view: memoryview) -> None:  # the helper's side: a file
        helper_failed.set()
        raise OSError(28, "No space left on device")

    with pytest.raises(TimeoutError, match="went quiet"):
        pipelined_copy(fill, drain, fill_in_thread=False)
    assert not helper_threads()


def test_checksums_what_it_copies(cpus: int) -> None:
    # The agent's shape: checksum on the helper's side, the count from the copy.
    data = bytes(range(256)) * 5000
    source, sink = source_and_sink(data)
    crc = 0

    def drain(view: memoryview) -> None:
        nonlocal crc
        crc = zlib.crc32(view, crc)
        sink.write(view)

    assert pipelined_copy(source.readinto, drain, fill_in_thread=False) == len(data)
    assert crc == zlib.crc32(data)
    assert sink.getvalue() == data


@pytest.mark.parametrize("fill_in_thread", [True, False])
def test_one_cpu_uses_no_thread(fill_in_thread: bool, cpus: int) -> None:
    threads: set[str] = set()
    left = 5

    def fill(view: memoryview) -> int:
        nonlocal left
        threads.add(threading.current_thread().name)
        left -= 1
        return 4 if left >= 0 else 0

    def drain(view: memoryview) -> None:
        threads.add(threading.current_thread().name)

    assert pipelined_copy(fill, drain, fill_in_thread=fill_in_thread, buffer_size=4) == 20
    caller = threading.current_thread().name
    assert threads == ({caller} if cpus == 1 else {caller, THREAD})


class FakeSocket:
    """The two calls the SDK's data-channel copies make, on bytes in memory."""

    def __init__(self, incoming: bytes = b"") -> None:
        self.incoming = io.BytesIO(incoming)
        self.sent = bytearray()

    def sendall(self, data: memoryview) -> None:
        self.sent += data

    def recv_into(self, view: memoryview) -> int:
        return self.incoming.readinto(view)


class ReadOnly:
    """A source with read() and no readinto(); once its data is out, read() returns ``then``."""

    def __init__(self, data: bytes, then: bytes | None = b"") -> None:
        self.data, self.then = io.BytesIO(data), then

    def read(self, n: int) -> bytes | None:
        return self.data.read(n) or self.then


@pytest.mark.parametrize("readinto", [True, False], ids=["readinto", "read only"])
def test_sdk_sends_and_checksums_every_byte(readinto: bool, cpus: int) -> None:
    from vsockrpc.agent.checksum import new_hasher
    from vsockrpc.agent.v1 import agent_pb2 as pb
    from vsockrpc.sdk._files import _send_raw

    data = bytes(range(256)) * 9000  # over two buffers
    sock, digest = FakeSocket(), new_hasher(pb.CHECKSUM_CRC32)
    source = io.BytesIO(data) if readinto else ReadOnly(data)
    assert _send_raw(sock, source, digest) == len(data)  # type: ignore[arg-type]
    assert sock.sent == data
    assert digest.digest() == zlib.crc32(data).to_bytes(4, "big")


def test_sdk_source_returning_none_ends_the_stream(cpus: int) -> None:
    from vsockrpc.agent.checksum import new_hasher
    from vsockrpc.agent.v1 import agent_pb2 as pb
    from vsockrpc.sdk._files import _send_raw

    sock = FakeSocket()
    source = ReadOnly(b"abc", then=None)
    assert _send_raw(sock, source, new_hasher(pb.CHECKSUM_CRC32)) == 3  # type: ignore[arg-type]
    assert sock.sent == b"abc"


def test_sdk_source_returning_too_much_is_an_error(cpus: int) -> None:
    from vsockrpc.agent.checksum import new_hasher
    from vsockrpc.agent.v1 import agent_pb2 as pb
    from vsockrpc.sdk._files import _send_raw

    class Greedy:
        def read(self, n: int) -> bytes:
            return bytes(n + 1)

    # one buffer of all the bytes on one CPU, PIPELINE_BUFFER_SIZE each when overlapping
    asked = PIPELINE_BUFFER_SIZE * (PIPELINE_BUFFERS if cpus < 2 else 1)
    with pytest.raises(ValueError, match=rf"read\({asked}\) returned {asked + 1} bytes"):
        _send_raw(FakeSocket(), Greedy(), new_hasher(pb.CHECKSUM_CRC32))  # type: ignore[arg-type]
    assert not helper_threads()


def test_sdk_receives_and_checksums_every_byte(cpus: int) -> None:
    from vsockrpc.agent.checksum import new_hasher
    from vsockrpc.agent.v1 import agent_pb2 as pb
    from vsockrpc.sdk._files import _receive_raw

    data = bytes(range(256)) * 9000
    sink, digest = io.BytesIO(), new_hasher(pb.CHECKSUM_CRC32)
    assert _receive_raw(FakeSocket(data), sink, digest) == len(data)  # type: ignore[arg-type]
    assert sink.getvalue() == data
    assert digest.digest() == zlib.crc32(data).to_bytes(4, "big")
