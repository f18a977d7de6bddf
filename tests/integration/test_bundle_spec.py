"""`vsockrpc bundle --spec`: the single-file agent carries an image spec's services, so a VM
(or any Linux) running it serves the same user service next to the agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vsockrpc import rpc
from vsockrpc.bundle import build_bundle
from vsockrpc.payload import load_spec

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kvstore"
sys.path.insert(0, str(EXAMPLE))
from kvstore import kvstore_pb2 as kv_pb  # noqa: E402
from kvstore import kvstore_pb2_grpc as kv_grpc  # noqa: E402

HOST_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
BARE_PYTHON = getattr(sys, "_base_executable", sys.executable)


def test_bundle_with_a_spec_serves_its_service_on_a_bare_python(tmp_path: Path) -> None:
    out = tmp_path / "kv-agent"
    build_bundle(out, pythons=(HOST_PYTHON,), spec=load_spec(EXAMPLE / "vsockrpc.toml"))
    with zipfile.ZipFile(out) as zf:
        config = json.loads(zf.read("payload/vsockrpc-guest.json"))
        assert "payload/kvstore/service.py" in zf.namelist()
    assert config["services"] == ["kvstore.service:register"]
    with tempfile.TemporaryDirectory(prefix="bundle-", dir="/tmp") as short:
        address = f"unix:{short}/agent.sock"
        env = {"PATH": os.environ["PATH"], "VSOCKRPC_BUNDLE_CACHE": f"{short}/cache"}
        proc = subprocess.Popen(
            [BARE_PYTHON, "-I", "-S", str(out), "--listen", address],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            rpc.wait_until_ready(address, timeout=60)
            with rpc.channel(address) as ch:
                kv = kv_grpc.KeyValueStub(ch)  # type: ignore[no-untyped-call]
                assert kv.Put(kv_pb.PutRequest(key="k", value=b"v"), timeout=10).version == 1
                with pytest.raises(grpc.RpcError) as info:  # the spec's [env] came along
                    kv.Put(kv_pb.PutRequest(key="k", value=b"x" * 65537), timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                health = health_pb2_grpc.HealthStub(ch)
                check = health_pb2.HealthCheckRequest(service="kvstore.v1.KeyValue")
                assert health.Check(check, timeout=10).status == 1  # SERVING
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0
            assert proc.stderr is not None
            proc.stderr.close()
