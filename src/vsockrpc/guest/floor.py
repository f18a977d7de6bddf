"""The boot bench's floor: a bare grpcio Addition server as PID 1, with nothing of vsockrpc.

``vsockrpc bench boot`` boots the project's image with ``init=`` this program
(:data:`vsockrpc.image.agent.FLOOR_INIT_PATH`) next to its ordinary boots, and compares the time
Python takes from the loader's hand-over to a listening server: the interpreter, ``import grpc``,
the Addition stubs and a started server. What the agent takes beyond that is vsockrpc's own
(PID 1's set-up, the agent's services, health, reflection, the vsock relay).

It is loaded by file path (``vsockrpc_floor``), never imported as ``vsockrpc.guest.floor``: that
would run ``vsockrpc/__init__``. The Addition stubs and the asyncio stand-ins of
:mod:`vsockrpc.guest.deferred` (standard library only; any grpcio server could use them) are
loaded by path too. It prints the two console lines the launcher times, serves gRPC on an
abstract Unix socket and only listens on vsock: the bench times it to the listening socket, not
to an answered call.
"""

import os
import signal
import socket
import sys
from concurrent import futures
from importlib.util import module_from_spec, spec_from_file_location
from types import ModuleType
from typing import Any

# vsockrpc.agent.markers, repeated here so that nothing of vsockrpc is imported
# (tests/integration/test_guest_floor.py checks that they agree).
INIT_STARTED = "vsockrpc-guest: init started"
READY = "vsockrpc-guest: ready"
VSOCK_PORT = 9999
_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, path: str) -> ModuleType:
    spec = spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(address: str) -> Any:
    """A started ``grpc.Server`` answering ``VsockService.Addition`` on ``address``."""
    deferred = _load("vsockrpc_floor_deferred", os.path.join(_HERE, "deferred.py"))
    with deferred.deferring():
        import grpc

        pb = _load(
            "vsockrpc_floor_pb2", os.path.join(_HERE, os.pardir, "proto", "vsock_service_pb2.py")
        )

    def addition(request: Any, context: Any) -> Any:
        return pb.AdditionResponse(c=request.a + request.b)

    handler = grpc.method_handlers_generic_handler(
        "popovicu_vsock.VsockService",
        {
            "Addition": grpc.unary_unary_rpc_method_handler(
                addition,
                request_deserializer=pb.AdditionRequest.FromString,
                response_serializer=pb.AdditionResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=(handler,))
    server.add_insecure_port(address)
    server.start()
    return server


def main() -> None:
    """PID 1's body: serve, listen on vsock, then wait until the guest is powered off."""
    print(f"{INIT_STARTED} (bench floor: bare grpcio)", file=sys.stderr, flush=True)
    server = serve("unix-abstract:vsockrpc-floor")
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, VSOCK_PORT))
    listener.listen()
    print(f"{READY} on vsock:-1:{VSOCK_PORT} (bench floor)", file=sys.stderr, flush=True)
    server.wait_for_termination()  # the launcher's Ctrl-Alt-Del reboots the guest (-no-reboot)
    while True:  # PID 1 never returns: a returning init panics the kernel
        signal.pause()
