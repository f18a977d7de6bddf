"""Server processes the parts measure against (``python -m vsockrpc.bench._servers KIND PATH``):

- ``stream``: vsockrpc's :func:`vsockrpc.rpc.serve` with Addition and a byte-stream service
  (the relay part's far end);
- ``grpcio``: a bare grpcio server with the same Addition servicer and nothing else (the rpc
  part's reference for "vsockrpc adds nothing per call").

Each listens on the Unix socket PATH (mode 0600 through the umask) and stops at EOF on stdin.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc

STREAM_SERVICE = "vsockrpc.bench.Stream"
CHUNK = 1 << 20


def _download(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
    size = int(request)
    block = b"\x5a" * CHUNK
    for offset in range(0, size, CHUNK):
        yield block[: min(CHUNK, size - offset)]


def _upload(requests: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
    return str(sum(len(r) for r in requests)).encode()


def register_stream(server: grpc.Server) -> None:
    handlers = {
        "Download": grpc.unary_stream_rpc_method_handler(_download),
        "Upload": grpc.stream_unary_rpc_method_handler(_upload),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(STREAM_SERVICE, handlers),)
    )


def main(argv: list[str]) -> int:
    kind, path = argv
    os.umask(0o077)
    if kind == "stream":
        from vsockrpc import rpc
        from vsockrpc.services import addition

        with rpc.serve([addition.register, register_stream], [f"unix:{path}"]) as server:
            sys.stdin.read()
            server.stop(None)
        return 0
    if kind == "grpcio":
        from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
        from vsockrpc.services.addition import AdditionServicer

        bare = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_VsockServiceServicer_to_server(AdditionServicer(), bare)  # type: ignore[no-untyped-call]
        bare.add_insecure_port(f"unix:{path}")
        bare.start()
        sys.stdin.read()
        bare.stop(None)
        return 0
    print(f"unknown server kind {kind!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
