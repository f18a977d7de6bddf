"""The SDK against an agent that lies: the guest is a sandbox, so what its agent answers is
checked before the host acts on it. A fake Files service on a Unix socket plays the agent."""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import AgentError
from vsockrpc.sdk import Guest

PAYLOAD = b"written by the guest"


class LyingFiles(pb_grpc.FilesServicer):
    def __init__(self, listed: list[bytes]) -> None:
        self.listed = listed

    def Stat(self, request: pb.StatRequest, context: grpc.ServicerContext) -> pb.FileInfo:
        return pb.FileInfo(path=request.path, type=pb.FILE_TYPE_DIRECTORY, mode=0o755)

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> Iterator[pb.FileInfo]:
        for path in self.listed:
            yield pb.FileInfo(path=path, type=pb.FILE_TYPE_REGULAR, size=len(PAYLOAD), mode=0o644)

    def Download(
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadResponse]:
        if request.path.endswith(b"trailer-first"):  # an empty file's trailer, but no header
            empty = pb.TransferTrailer(digest=zlib.crc32(b"").to_bytes(4, "big"), size=0)
            yield pb.DownloadResponse(trailer=empty)
            return
        info = pb.FileInfo(path=request.path, type=pb.FILE_TYPE_REGULAR, size=len(PAYLOAD))
        yield pb.DownloadResponse(header=info)
        yield pb.DownloadResponse(data=PAYLOAD)
        digest = zlib.crc32(PAYLOAD).to_bytes(4, "big")
        yield pb.DownloadResponse(trailer=pb.TransferTrailer(digest=digest, size=len(PAYLOAD)))

    def OpenDataChannel(
        self, request: pb.OpenDataChannelRequest, context: grpc.ServicerContext
    ) -> pb.OpenDataChannelResponse:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "in-band only")
        raise AssertionError("unreachable")


@pytest.fixture
def lying(tmp_path: Path) -> Iterator[tuple[str, LyingFiles]]:
    files = LyingFiles([])
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_FilesServicer_to_server(files, server)  # type: ignore[no-untyped-call]
    sock = tmp_path / "fake.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        yield f"unix:{sock}", files
    finally:
        server.stop(None)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("listed", [b"../escaped", b"{tmp}/absolute", b"a/../../escaped", b""])
def test_get_refuses_entries_outside_the_directory(
    lying: tuple[str, LyingFiles], tmp_path: Path, listed: bytes
) -> None:
    address, files = lying
    files.listed = [b"fine.txt", listed.replace(b"{tmp}", os.fsencode(tmp_path))]
    dest = tmp_path / "dest" / "inner"
    dest.parent.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with Guest(address, call_timeout=10) as g, pytest.raises(AgentError) as err:
        g.get("/guest/dir", dest)
    assert err.value.code == "DATA_LOSS"
    assert "which is not a path below that directory" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written outside
    assert not (tmp_path / "dest" / "escaped").exists() and not (tmp_path / "absolute").exists()


@pytest.mark.timeout(60)
def test_a_trailer_before_any_header_is_data_loss(lying: tuple[str, LyingFiles]) -> None:
    address, _ = lying
    with Guest(address, call_timeout=10) as g, pytest.raises(AgentError) as err:
        g.download("/x/trailer-first", io.BytesIO(), size_hint=0)
    assert err.value.code == "DATA_LOSS" and "trailer before any header" in str(err.value)
