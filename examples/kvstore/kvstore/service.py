"""The KeyValue servicer and its registrar: what the guest's agent imports and serves.

``register`` has the shape every vsockrpc service has — a callable taking the ``grpc.Server``
— and is named in the image spec (``vsockrpc.toml``: ``register = "kvstore.service:register"``).
The store lives in memory; ``KVSTORE_MAX_VALUE`` (bytes, from the spec's ``[env]``) caps a value.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import grpc

from kvstore import kvstore_pb2 as pb
from kvstore import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger("kvstore")


class KeyValue(pb_grpc.KeyValueServicer):
    def __init__(self, max_value: int) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, tuple[bytes, int]] = {}
        self._max_value = max_value

    def Put(self, request: pb.PutRequest, context: grpc.ServicerContext) -> pb.PutReply:
        if not request.key:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty key")
        if len(request.value) > self._max_value:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"value of {len(request.value)} bytes exceeds KVSTORE_MAX_VALUE={self._max_value}",
            )
        with self._lock:
            version = self._data.get(request.key, (b"", 0))[1] + 1
            self._data[request.key] = (request.value, version)
        log.info("put %s (version %d)", request.key, version)
        return pb.PutReply(version=version)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetReply:
        with self._lock:
            found = self._data.get(request.key)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no key {request.key!r}")
        return pb.GetReply(value=found[0], version=found[1])

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteReply:
        with self._lock:
            existed = self._data.pop(request.key, None) is not None
        return pb.DeleteReply(existed=existed)

    def Scan(self, request: pb.ScanRequest, context: grpc.ServicerContext) -> Iterator[pb.Entry]:
        with self._lock:
            items = sorted((k, v) for k, v in self._data.items() if k.startswith(request.prefix))
        for key, (value, version) in items:
            yield pb.Entry(key=key, value=value, version=version)


def register(server: grpc.Server) -> None:
    """Add the KeyValue service to ``server`` (called once by the guest agent at start)."""
    max_value = int(os.environ.get("KVSTORE_MAX_VALUE", "1048576"))
    pb_grpc.add_KeyValueServicer_to_server(KeyValue(max_value), server)
