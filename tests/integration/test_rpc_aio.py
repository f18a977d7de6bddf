"""``vsockrpc.rpc.aio.channel``: Addition from asyncio, direct and through the relay."""

from __future__ import annotations

import asyncio
import glob
import os
import tempfile
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.integration._relay_helpers import HybridPeer
from vsockrpc import rpc
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.rpc import aio
from vsockrpc.services import addition


async def _add(address: str, a: int, b: int) -> int:
    async with aio.channel(address) as ch:
        stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
        reply: pb.AdditionResponse = await stub.Addition(pb.AdditionRequest(a=a, b=b), timeout=10)
        return reply.c


@pytest.mark.timeout(60)
def test_aio_addition_direct_and_relayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp(prefix="t", dir="/tmp"))
    dirs = set(glob.glob(os.path.join(tempfile.gettempdir(), "vsockrpc-*")))
    assert dirs == set()
    device = str(tmp_path / "vm.vsock")
    guest = str(tmp_path / "guest.sock")
    with (
        rpc.serve([addition.register], [f"unix:{guest}"]),
        HybridPeer(device, {9999: guest}) as peer,
    ):
        assert asyncio.run(_add(f"unix:{guest}", 5, 7)) == 12
        assert asyncio.run(_add(f"hvsock:{device}:9999", 40, 2)) == 42
        assert peer.commands == [b"CONNECT 9999"]
    assert glob.glob(os.path.join(tempfile.gettempdir(), "*")) == []
    os.rmdir(tempfile.gettempdir())


@pytest.mark.timeout(60)
def test_aio_relayed_errors_carry_the_dial_error(tmp_path: Path) -> None:
    address = f"hvsock:{tmp_path}/gone.sock:9999"

    async def call() -> grpc.aio.AioRpcError:
        async with aio.channel(address) as ch:
            stub = pb_grpc.VsockServiceStub(ch)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Addition(pb.AdditionRequest(a=1, b=2), timeout=10)
            return info.value

    error = asyncio.run(call())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == f"cannot connect to {address}: No such file or directory"
