"""Boot the kvstore guest and use its KeyValue service from the host with our own stubs.

    sudo .venv/bin/python examples/kvstore/host.py     (or: examples/kvstore/run)

Builds the image from ``vsockrpc.toml`` (cached: a second run boots at once; editing
``kvstore/service.py`` rebuilds only the image's top layer), boots it with
``vsockrpc.vm.launch``, calls Put/Get/Scan through ``vsockrpc.rpc.channel(vm.address())``,
checks the service's health, and powers the guest off.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the example's own package: its generated stubs

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from kvstore import kvstore_pb2 as pb  # noqa: E402
from kvstore import kvstore_pb2_grpc as pb_grpc  # noqa: E402

from vsockrpc import rpc  # noqa: E402
from vsockrpc.image import build_image  # noqa: E402
from vsockrpc.payload import load_spec  # noqa: E402
from vsockrpc.vm import launch  # noqa: E402

SERVICE = "kvstore.v1.KeyValue"


def main() -> int:
    spec = load_spec(HERE / "vsockrpc.toml")
    t0 = time.monotonic()
    image = build_image(spec=spec, name=spec.name)
    print(f"image {spec.name}: {image.path} ({time.monotonic() - t0:.1f} s)", flush=True)
    t0 = time.monotonic()
    with launch(image, memory_mib=spec.memory or 512, cpus=spec.cpus or 1) as vm:
        print(f"guest {vm.name} up at {vm.address()} ({time.monotonic() - t0:.1f} s)")
        with rpc.channel(vm.address()) as channel:
            kv = pb_grpc.KeyValueStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
            serving = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
            print(f"health of {SERVICE}: {serving}")
            for key, value in [
                ("fruit/apple", b"red"),
                ("fruit/kiwi", b"green"),
                ("veg/leek", b"white"),
            ]:
                reply = kv.Put(pb.PutRequest(key=key, value=value), timeout=30)
                print(f"put {key} = {value.decode()} (version {reply.version})")
            got = kv.Get(pb.GetRequest(key="fruit/kiwi"), timeout=30)
            print(f"get fruit/kiwi -> {got.value.decode()} (version {got.version})")
            scanned = [e.key for e in kv.Scan(pb.ScanRequest(prefix="fruit/"), timeout=30)]
            print(f"scan fruit/ -> {', '.join(scanned)}")
            try:
                kv.Put(pb.PutRequest(key="big", value=b"x" * 70000), timeout=30)
            except grpc.RpcError as err:
                print(f"put of 70000 bytes -> {err.code().name}: {err.details()}")
    return 0 if scanned == ["fruit/apple", "fruit/kiwi"] else 1


if __name__ == "__main__":
    sys.exit(main())
