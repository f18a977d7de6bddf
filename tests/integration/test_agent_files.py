"""Files against a real agent on a Unix socket: checksummed transfers, trees, path operations."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.agent_harness import AgentUnderTest, sha256_file
from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import AgentError, BadInputError
from vsockrpc.sdk import FileType, Guest

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024


def _leftovers(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".part")]


def test_64mib_upload_and_download_keep_checksum_mode_and_mtime(
    guest: Guest, tmp_path: Path
) -> None:
    source = tmp_path / "source.bin"
    with open(source, "wb") as f:
        for i in range(64):
            f.write(hashlib.sha256(str(i).encode()).digest() * (MIB // 32))
    os.chmod(source, 0o640)
    os.utime(source, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    remote = tmp_path / "guest" / "deep" / "copy.bin"
    stats = guest.put(source, remote)
    assert stats.files == 1 and stats.bytes == 64 * MIB
    assert sha256_file(remote) == sha256_file(source)
    assert os.stat(remote).st_mode & 0o7777 == 0o640
    assert os.stat(remote).st_mtime_ns == 1_600_000_000_123_456_789
    back = tmp_path / "back.bin"
    guest.get(remote, back)
    assert sha256_file(back) == sha256_file(source)
    assert os.stat(back).st_mode & 0o7777 == 0o640
    assert os.stat(back).st_mtime_ns == 1_600_000_000_123_456_789
    assert _leftovers(remote.parent) == [] and _leftovers(tmp_path) == []


def _raw_upload(agent: AgentUnderTest, parts: Iterator[pb.UploadRequest]) -> grpc.RpcError:
    with grpc.insecure_channel(agent.address) as channel:
        stub = pb_grpc.FilesStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Upload(parts, timeout=30)
    return info.value


def test_corrupt_and_short_uploads_fail_loudly_and_leave_nothing(
    agent: AgentUnderTest, tmp_path: Path
) -> None:
    target = tmp_path / "target.bin"
    data = os.urandom(MIB)
    header = pb.UploadHeader(path=bytes(target), size=len(data))

    def corrupt() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        yield pb.UploadRequest(data=data)
        bad = hashlib.sha256(data + b"x").digest()
        yield pb.UploadRequest(trailer=pb.TransferTrailer(digest=bad, size=len(data)))

    def short() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        yield pb.UploadRequest(data=data[:1000])
        digest = hashlib.sha256(data[:1000]).digest()
        yield pb.UploadRequest(trailer=pb.TransferTrailer(digest=digest, size=1000))

    def no_trailer() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        yield pb.UploadRequest(data=data[:1000])

    for parts in (corrupt(), short(), no_trailer()):
        err = _raw_upload(agent, parts)
        assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
        assert not target.exists()
        assert _leftovers(tmp_path) == []


def test_upload_cut_midway_leaves_no_partial_file_and_keeps_old_content(
    agent: AgentUnderTest, tmp_path: Path
) -> None:
    target = tmp_path / "existing.bin"
    target.write_bytes(b"old content")
    sent_some = threading.Event()

    def parts() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=pb.UploadHeader(path=bytes(target), size=64 * MIB))
        for _ in range(8):
            yield pb.UploadRequest(data=bytes(MIB))
        sent_some.set()
        threading.Event().wait(30)  # stall: the client cancels the call meanwhile

    with grpc.insecure_channel(agent.address) as channel:
        future = pb_grpc.FilesStub(channel).Upload.future(parts())
        assert sent_some.wait(20)
        # The temporary file exists while the transfer runs...
        deadline = 0
        while not _leftovers(tmp_path) and deadline < 200:
            threading.Event().wait(0.05)
            deadline += 1
        assert _leftovers(tmp_path)
        future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=10)
    # ...and is gone once the agent saw the cut.
    for _ in range(100):
        if not _leftovers(tmp_path):
            break
        threading.Event().wait(0.05)
    assert _leftovers(tmp_path) == []
    assert target.read_bytes() == b"old content"


def test_directory_tree_round_trip_with_odd_names(guest: Guest, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "top.txt").write_text("top\n")
    (tree / "a" / "mid.bin").write_bytes(os.urandom(300_000))
    (tree / "a" / "b" / "c" / "leaf").write_bytes(b"")
    odd = os.fsencode(tree / "a") + b"/caf\xe9-\xff.txt"  # not UTF-8
    with open(odd, "wb") as f:
        f.write(b"latin-1 name\n")
    os.chmod(tree / "top.txt", 0o600)
    os.symlink("top.txt", tree / "link-to-top")
    remote = tmp_path / "remote-tree"
    stats = guest.put(tree, remote)
    assert stats.files == 5 and stats.directories == 5
    back = tmp_path / "back-tree"
    guest.get(remote, back)

    def snapshot(root: Path) -> dict[bytes, tuple[str, int]]:
        out = {}
        rootb = os.fsencode(root)
        for directory, _dirs, files in os.walk(rootb):
            for name in files:
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                out[os.path.relpath(path, rootb)] = (content, os.stat(path).st_mode & 0o777)
            out[os.path.relpath(directory, rootb) + b"/"] = ("dir", 0)
        return out

    expected = snapshot(tree)
    assert snapshot(back) == expected
    assert b"a/caf\xe9-\xff.txt" in expected
    listed = {e.path: e.type for e in guest.listdir(remote, recursive=True)}
    assert listed[b"a/b/c"] is FileType.DIRECTORY
    assert listed[b"a/caf\xe9-\xff.txt"] is FileType.REGULAR


def test_stat_list_mkdir_remove_rename(guest: Guest, tmp_path: Path) -> None:
    base = tmp_path / "ops"
    info = guest.makedirs(base / "x" / "y")
    assert info.is_dir
    guest.makedirs(base / "x" / "y")  # mkdir -p: existing is fine
    guest.write_bytes(base / "x" / "f.txt", b"hello")
    assert guest.read_bytes(base / "x" / "f.txt") == b"hello"
    st = guest.stat(base / "x" / "f.txt")
    assert st.type is FileType.REGULAR and st.size == 5
    assert [e.path for e in guest.listdir(base / "x")] == [b"f.txt", b"y"]
    moved = guest.rename(base / "x" / "f.txt", base / "g.txt")
    assert moved.size == 5 and (base / "g.txt").read_bytes() == b"hello"
    guest.write_bytes(base / "h.txt", b"h")
    with pytest.raises(AgentError) as err:
        guest.rename(base / "g.txt", base / "h.txt", no_overwrite=True)
    assert err.value.code == "ALREADY_EXISTS"
    with pytest.raises(AgentError) as err:
        guest.remove(base / "x")
    assert err.value.code == "FAILED_PRECONDITION"  # not empty, not recursive
    assert guest.remove(base / "x", recursive=True)
    assert not (base / "x").exists()
    assert guest.remove(base / "x", missing_ok=True) is False
    assert guest.exists(base / "g.txt") and not guest.exists(base / "x")


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda g, t: g.stat("relative/path"), "INVALID_ARGUMENT"),
        (lambda g, t: g.stat(b"/tmp/nul\0byte"), "INVALID_ARGUMENT"),
        (lambda g, t: g.stat(t / "missing"), "NOT_FOUND"),
        (lambda g, t: g.listdir(t / "missing"), "NOT_FOUND"),
        (lambda g, t: g.read_bytes(t), "FAILED_PRECONDITION"),  # a directory
        (lambda g, t: g.read_bytes(t / "missing"), "NOT_FOUND"),
        (lambda g, t: g.remove("/"), "INVALID_ARGUMENT"),
        # Other spellings of the root. Never recursive here: were the guard to miss one, the
        # test would only see rmdir("/") fail (EBUSY), not wipe the machine running it.
        (lambda g, t: g.remove("//", recursive=False), "INVALID_ARGUMENT"),
        (lambda g, t: g.remove("//tmp/..", recursive=False), "INVALID_ARGUMENT"),
        (lambda g, t: g.remove("/proc/self/root/", recursive=False), "INVALID_ARGUMENT"),
        (lambda g, t: g.remove(f"{t}/rootlink/", recursive=False), "INVALID_ARGUMENT"),
        (lambda g, t: g.read_bytes(t / "fifo"), "FAILED_PRECONDITION"),  # used to hang
        (lambda g, t: g.remove(t / "missing"), "NOT_FOUND"),
        (lambda g, t: g.write_bytes(t, b"x"), "FAILED_PRECONDITION"),  # existing directory
        (lambda g, t: g.write_bytes("/", b"x"), "INVALID_ARGUMENT"),
        (lambda g, t: g.write_bytes(b"/tmp/" + b"n" * 300, b"x"), "INVALID_ARGUMENT"),
        (lambda g, t: g.makedirs(t / "file.txt" / "sub"), "FAILED_PRECONDITION"),
    ],
)
def test_bad_paths_get_clear_statuses(
    guest: Guest, tmp_path: Path, call: object, code: str
) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "rootlink").symlink_to("/")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(AgentError) as err:
        call(guest, tmp_path)  # type: ignore[operator]
    assert err.value.code == code
    assert guest.ping() < 5  # still serving


def test_upload_no_overwrite(guest: Guest, tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_bytes(b"keep")
    import io

    with pytest.raises(AgentError) as err:
        guest.upload(io.BytesIO(b"new"), target, size=3, no_overwrite=True)
    assert err.value.code == "ALREADY_EXISTS"
    assert target.read_bytes() == b"keep"
    assert _leftovers(tmp_path) == []


class _ReadOnly:
    """A source with ``read`` but no ``readinto`` (the SDK's other upload path)."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._file.read(n)


def test_crc32_is_the_default_sha256_selectable_and_both_catch_corruption(
    agent: AgentUnderTest, guest: Guest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vsockrpc.agent.files")
    data = os.urandom(3 * MIB + 17)
    guest.write_bytes(tmp_path / "c.bin", data)  # the fixture's Guest: default checksum
    assert guest.read_bytes(tmp_path / "c.bin") == data
    with Guest(agent.address, checksum="sha256") as sha:
        sha.upload(_ReadOnly(data), tmp_path / "s.bin", size=len(data))  # type: ignore[arg-type]
        sink = io.BytesIO()
        sha.download(tmp_path / "s.bin", sink)
        assert sink.getvalue() == data
    uploads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("uploaded")]
    assert len(uploads) == 2
    assert uploads[0].endswith("c.bin' (3145745 bytes, crc32)"), uploads
    assert uploads[1].endswith("s.bin' (3145745 bytes, sha256)"), uploads
    assert any(
        "s.bin' went over a data channel (3145745 bytes, sha256)" in r.getMessage()
        for r in caplog.records
    )
    header = pb.UploadHeader(
        path=bytes(tmp_path / "d.bin"), size=len(data), checksum=pb.CHECKSUM_CRC32
    )

    def corrupt() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        yield pb.UploadRequest(data=data[:-1] + bytes([data[-1] ^ 0xFF]))  # always differs
        good = zlib.crc32(data).to_bytes(4, "big")
        yield pb.UploadRequest(trailer=pb.TransferTrailer(digest=good, size=len(data)))

    assert _raw_upload(agent, corrupt()).code() == grpc.StatusCode.DATA_LOSS
    assert not (tmp_path / "d.bin").exists()
    with pytest.raises(ValueError, match="checksum"):
        Guest(agent.address, checksum="md5")  # type: ignore[arg-type]
    for bad in ({"wait": -1.0}, {"wait": float("nan")}, {"call_timeout": 0}, {"call_timeout": -5}):
        with pytest.raises(BadInputError, match="must be a number of seconds"):
            Guest(agent.address, **bad)  # type: ignore[arg-type]


def test_large_transfers_use_the_data_channel(
    agent: AgentUnderTest, guest: Guest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vsockrpc.agent.files")
    data = os.urandom(5 * MIB)
    (tmp_path / "src.bin").write_bytes(data)
    guest.put(tmp_path / "src.bin", tmp_path / "dst.bin")
    guest.get(tmp_path / "dst.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    messages = [r.getMessage() for r in caplog.records]
    assert any("upload of" in m and "data channel" in m for m in messages)
    assert any("download of" in m and "data channel" in m for m in messages)
    with Guest(agent.address, data_channel=False) as inband:
        caplog.clear()
        inband.put(tmp_path / "src.bin", tmp_path / "dst2.bin")
        assert not any("data channel" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "dst2.bin").read_bytes() == data


def test_cut_data_channel_fails_loudly_and_leaves_nothing(
    agent: AgentUnderTest, tmp_path: Path
) -> None:
    target = tmp_path / "cut.bin"
    with grpc.insecure_channel(agent.address) as channel:
        stub = pb_grpc.FilesStub(channel)
        reply = stub.OpenDataChannel(pb.OpenDataChannelRequest(), timeout=10)
        assert reply.unix_path and reply.ticket
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(reply.unix_path)
        raw.sendall(reply.ticket.encode() + b"\n")
        header = pb.UploadHeader(path=bytes(target), size=8 * MIB, ticket=reply.ticket)
        stalled = threading.Event()

        def parts() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(header=header)
            stalled.wait(30)

        future = stub.Upload.future(parts())
        raw.sendall(bytes(MIB))
        raw.close()  # cut after 1 of 8 MiB
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=20)
        stalled.set()
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        assert "1048576 of 8388608" in info.value.details()
        bogus = pb.UploadHeader(path=bytes(target), size=10, ticket="0" * 32)
        with pytest.raises(grpc.RpcError) as info:
            stub.Upload(iter([pb.UploadRequest(header=bogus)]), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not target.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("checksum", [pb.CHECKSUM_CRC32, pb.CHECKSUM_SHA256])
def test_corrupt_bytes_on_the_data_channel_fail_loudly_and_leave_nothing(
    agent: AgentUnderTest, tmp_path: Path, checksum: pb.Checksum.ValueType
) -> None:
    target = tmp_path / "corrupt.bin"
    target.write_bytes(b"old content")
    data = os.urandom(2 * MIB)
    sent = bytearray(data)
    sent[MIB] ^= 0x01  # one bit flipped in transit, size unchanged
    if checksum == pb.CHECKSUM_CRC32:
        digest = zlib.crc32(data).to_bytes(4, "big")
    else:
        digest = hashlib.sha256(data).digest()
    with grpc.insecure_channel(agent.address) as channel:
        stub = pb_grpc.FilesStub(channel)
        reply = stub.OpenDataChannel(pb.OpenDataChannelRequest(), timeout=10)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(20)
            raw.connect(reply.unix_path)
            raw.sendall(reply.ticket.encode() + b"\n")
            header = pb.UploadHeader(
                path=bytes(target), size=len(data), ticket=reply.ticket, checksum=checksum
            )

            def parts() -> Iterator[pb.UploadRequest]:
                yield pb.UploadRequest(header=header)
                raw.sendall(sent)
                raw.close()
                yield pb.UploadRequest(trailer=pb.TransferTrailer(digest=digest, size=len(data)))

            with pytest.raises(grpc.RpcError) as info:
                stub.Upload(parts(), timeout=30)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "checksum mismatch" in (info.value.details() or "")
    assert target.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == []


def test_failed_upload_removes_the_parents_it_created(
    agent: AgentUnderTest, tmp_path: Path
) -> None:
    data = os.urandom(1000)
    header = pb.UploadHeader(
        path=bytes(tmp_path / "new" / "deeper" / "f.bin"), size=len(data), make_parents=True
    )

    def corrupt() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        yield pb.UploadRequest(data=data)
        bad = hashlib.sha256(data + b"x").digest()
        yield pb.UploadRequest(trailer=pb.TransferTrailer(digest=bad, size=len(data)))

    assert _raw_upload(agent, corrupt()).code() == grpc.StatusCode.DATA_LOSS
    assert list(tmp_path.iterdir()) == []  # neither new/ nor new/deeper/ stays behind
    (tmp_path / "kept").mkdir()
    header.path = bytes(tmp_path / "kept" / "new" / "f.bin")
    assert _raw_upload(agent, corrupt()).code() == grpc.StatusCode.DATA_LOSS
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]  # what existed before stays
    assert list((tmp_path / "kept").iterdir()) == []


class _KillsTheAgentAfterOneChunk(io.RawIOBase):
    """A source that SIGKILLs the agent process once the first chunk went out."""

    def __init__(self, agent: subprocess.Popen[bytes]) -> None:
        self._agent = agent
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self.reads += 1
        if self.reads == 2:
            self._agent.send_signal(signal.SIGKILL)
            self._agent.wait(timeout=10)
        buffer[:] = bytes(len(buffer))
        return len(buffer)


def test_upload_cut_by_a_dying_agent_fails_with_one_line_and_no_grpc_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    address = f"unix:{tmp_path}/agent.sock"
    # A SIGKILLed agent cannot remove its directories from TMPDIR: give it one of its own, short
    # enough to hold socket paths (rpc/_private.py), and remove it here.
    temp = Path(tempfile.mkdtemp())
    agent = subprocess.Popen(
        [sys.executable, "-m", "vsockrpc.guest", "--listen", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    caplog.set_level(logging.DEBUG)
    try:
        with Guest(address, wait=20) as g:
            source = _KillsTheAgentAfterOneChunk(agent)
            with pytest.raises(AgentError) as info:
                g.upload(source, tmp_path / "big.bin", size=64 * MIB)  # a data channel
        assert source.reads >= 2
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(timeout=10)
        shutil.rmtree(temp)
    message = str(info.value)
    assert "\n" not in message and "upload to" in message, message
    assert "Exception iterating requests" not in caplog.text
    assert "Traceback" not in caplog.text and "Traceback" not in capfd.readouterr().err
    time.sleep(0.2)  # a late log line from grpc's request thread would land here
    assert "Exception iterating requests" not in caplog.text
    assert not (tmp_path / "big.bin").exists()


def test_an_agent_stopped_by_sigterm_leaves_no_data_channel_directory(tmp_path: Path) -> None:
    """The Unix data channel's socket lives in a directory the agent makes in the temporary
    directory; an agent stopped by SIGTERM (the non-PID-1 way to stop it) must take it away."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    address = f"unix:{tmp_path}/agent.sock"
    agent = subprocess.Popen(
        [sys.executable, "-m", "vsockrpc.guest", "--listen", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    try:
        (tmp_path / "src.bin").write_bytes(os.urandom(2 * MIB))
        with Guest(address, wait=20) as g:
            g.put(tmp_path / "src.bin", tmp_path / "dst.bin")  # over a data channel
        made = [p.name for p in temp.iterdir()]
        assert any(name.startswith("vsockrpc-data-") for name in made), made
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
    assert (tmp_path / "dst.bin").read_bytes() == (tmp_path / "src.bin").read_bytes()
    assert not [p.name for p in temp.iterdir() if p.name.startswith("vsockrpc-data-")]


def test_a_long_path_is_cut_short_in_the_message(guest: Guest) -> None:
    # the whole value used to be repeated: over gRPC's 16 KiB header limit, the client saw
    # RESOURCE_EXHAUSTED instead of the agent's own status
    long = "/" + "a" * 100_000
    for call in (guest.stat, guest.read_bytes):
        with pytest.raises(AgentError) as err:
            call(long)
        assert err.value.code in ("INVALID_ARGUMENT", "NOT_FOUND"), err.value
        assert len(str(err.value)) < 1000 and "(100001 characters)" in str(err.value)


def _parked() -> int:
    """Data connections presented but not taken, in every data-channel hub of this process."""
    import gc

    from vsockrpc.services.agent.datachannel import DataChannels

    return sum(len(o._ready) for o in gc.get_objects() if isinstance(o, DataChannels))


def test_failed_transfers_leave_no_parked_data_connection(guest: Guest, tmp_path: Path) -> None:
    # Each call below opens a data channel, then fails before taking it: the connection used
    # to stay parked in the agent, one fd per call, for the agent's whole life.
    from tests.integration._relay_helpers import count_fds, wait_for

    with pytest.raises(AgentError):
        guest.download(tmp_path / "missing", io.BytesIO())  # warm-up: first listener, imports
    fds = count_fds()
    for _ in range(20):
        with pytest.raises(AgentError, match="NOT_FOUND"):
            guest.download(tmp_path / "missing", io.BytesIO())
        with pytest.raises(AgentError, match="NOT_FOUND"):
            guest.upload(
                io.BytesIO(b"x" * (1 << 20)),
                tmp_path / "no" / "f",
                size=1 << 20,
                make_parents=False,
            )
    assert wait_for(lambda: _parked() == 0), _parked()
    assert wait_for(lambda: count_fds() <= fds + 2), (count_fds(), fds)


@pytest.mark.timeout(60)
def test_a_silent_data_channel_frees_the_worker(
    agent: AgentUnderTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vsockrpc.services.agent import datachannel

    monkeypatch.setattr(datachannel, "IDLE_TIMEOUT", 1.0)
    with grpc.insecure_channel(agent.address) as ch:
        files = pb_grpc.FilesStub(ch)  # type: ignore[no-untyped-call]
        dc = files.OpenDataChannel(pb.OpenDataChannelRequest(), timeout=10)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as data:
            data.connect(dc.unix_path)
            data.sendall(dc.ticket.encode() + b"\n")  # then nothing: a stalled client
            header = pb.UploadHeader(path=os.fsencode(tmp_path / "f"), size=10, ticket=dc.ticket)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                files.Upload(iter([pb.UploadRequest(header=header)]), timeout=30)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "moved nothing for 1 s" in str(err.value.details())
            assert time.monotonic() - started < 15
    assert not (tmp_path / "f").exists() and os.listdir(tmp_path) == []


class _FailingSource(io.RawIOBase):
    """A source that gives 1 MiB, then fails like a disk that went away."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        if self.given >= 1 << 20:
            raise OSError(5, "Input/output error")
        n = min(len(buffer), (1 << 20) - self.given)
        buffer[:n] = b"y" * n
        self.given += n
        return n


@pytest.mark.timeout(60)
def test_a_source_failing_midway_fails_the_upload_at_once(guest: Guest, tmp_path: Path) -> None:
    # The data channel stayed open: the agent waited for the rest, the client for the reply.
    started = time.monotonic()
    with pytest.raises(AgentError, match="Input/output error"):
        guest.upload(_FailingSource(), tmp_path / "f", size=4 << 20)  # type: ignore[arg-type]
    assert time.monotonic() - started < 20
    assert os.listdir(tmp_path) == []  # no file, no .part
    assert guest.ping() < 5


def test_a_chunk_size_out_of_range_is_bad_input(guest: Guest, tmp_path: Path) -> None:
    # 0 sent nothing and blamed the agent (DATA_LOSS); over 4 MiB gRPC refused the message
    for chunk_size in (0, -1, 5 << 20):
        with pytest.raises(BadInputError, match="chunk_size must be 1 to"):
            guest.upload(io.BytesIO(b"abc"), tmp_path / "f", size=3, chunk_size=chunk_size)
    assert os.listdir(tmp_path) == []


def test_a_failed_upload_removes_the_parents_it_made(guest: Guest, tmp_path: Path) -> None:
    too_long = "n" * 300  # a name past NAME_MAX, two levels below a directory that is new
    with pytest.raises(AgentError) as err:
        guest.upload(io.BytesIO(b"x"), tmp_path / "new" / too_long / "f", size=1)
    assert err.value.code == "INVALID_ARGUMENT", err.value
    assert os.listdir(tmp_path) == []  # "new" used to stay


@pytest.mark.parametrize(
    ("target", "code", "message"),
    [
        ("new/", "INVALID_ARGUMENT", "does not name a file"),
        ("n" * 300, "INVALID_ARGUMENT", "file name longer than 255 bytes"),
        ("dangling/f", "NOT_FOUND", "upload to"),
    ],
)
def test_an_upload_that_cannot_land_is_refused_before_its_data(
    agent: AgentUnderTest, tmp_path: Path, target: str, code: str, message: str
) -> None:
    # The first two used to be refused at the final rename, after every byte had come; all
    # three named the agent's temporary file instead of the path asked for.
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    sent: list[int] = []

    def requests() -> Iterator[pb.UploadRequest]:
        path = os.fsencode(tmp_path) + b"/" + target.encode()  # (pathlib drops a trailing /)
        header = pb.UploadHeader(path=path, size=3 << 20, make_parents=True)
        yield pb.UploadRequest(header=header)
        for _ in range(3):
            sent.append(1)
            yield pb.UploadRequest(data=b"x" * (1 << 20))
            time.sleep(0.2)

    with grpc.insecure_channel(agent.address) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.FilesStub(ch).Upload(requests(), timeout=20)  # type: ignore[no-untyped-call]
    assert err.value.code().name == code
    details = str(err.value.details())
    assert message in details and ".part" not in details, details
    assert len(sent) < 3  # refused before the data had all been sent
    assert sorted(os.listdir(tmp_path)) == ["dangling"]


def _no_data_channel_threads(timeout: float = 5.0) -> bool:
    """True once no data-channel copy thread is left (the SDK's and the in-process agent's)."""
    from tests.integration._relay_helpers import wait_for

    return wait_for(
        lambda: not any(t.name == "vsockrpc-datachannel" for t in threading.enumerate()), timeout
    )


def test_a_write_failing_midway_on_the_data_channel_fails_the_upload_and_leaves_nothing(
    guest: Guest, tmp_path: Path
) -> None:
    """The agent's file write fails after 3 MiB of a 16 MiB upload (RLIMIT_FSIZE: EFBIG, on
    the thread that writes while another reads the socket): one line with the cause, the old
    content kept, no temporary file, no thread left, and the agent serves the next upload."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 * MIB, hard))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(AgentError) as info:
            guest.upload(io.BytesIO(os.urandom(16 * MIB)), target, size=16 * MIB)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert "\n" not in message and "File too large" in message, message
    assert target.read_bytes() == b"old"
    assert not _leftovers(tmp_path)
    assert _no_data_channel_threads()
    data = os.urandom(4 * MIB)
    guest.upload(io.BytesIO(data), target, size=len(data))
    assert target.read_bytes() == data


def test_a_sink_failing_midway_fails_the_download_and_frees_the_agent(
    guest: Guest, tmp_path: Path
) -> None:
    """The caller's sink fails after 2 MiB of a 16 MiB download (on the SDK's writing thread):
    the caller gets that error, both sides stop copying, and the agent serves the next one."""

    class FailingSink(io.RawIOBase):
        def __init__(self) -> None:
            self.written = 0

        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            n = len(memoryview(data))  # type: ignore[arg-type]
            if self.written + n > 2 * MIB:
                raise OSError(28, "No space left on device")
            self.written += n
            return n

    remote = tmp_path / "big.bin"
    remote.write_bytes(os.urandom(16 * MIB))
    sink = FailingSink()
    with pytest.raises(OSError, match="No space left"):
        guest.download(remote, sink)  # type: ignore[arg-type]
    assert sink.written <= 2 * MIB
    assert _no_data_channel_threads()
    copy = io.BytesIO()
    guest.download(remote, copy)
    assert copy.getvalue() == remote.read_bytes()
