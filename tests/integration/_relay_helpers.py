"""Test peers for relay and hybrid tests: a stand-in hybrid-vsock device, a stream service."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator

import grpc

from vsockrpc.rpc._relay import Relay

__all__ = ["STREAM_SERVICE", "HybridPeer", "count_fds", "register_stream_service", "wait_for"]


def _read_line(conn: socket.socket, limit: int = 256) -> bytes:
    line = bytearray()
    while len(line) < limit:
        byte = conn.recv(1)
        if not byte or byte == b"\n":
            break
        line += byte
    return bytes(line)


class HybridPeer:
    """A stand-in for a VMM's hybrid vsock device on the Unix socket ``path``.

    It reads ``CONNECT <port>\\n``; in mode ``"proxy"`` it connects to ``backends[port]`` (a Unix
    socket path standing in for the guest's listener), answers ``OK <ok_port>\\n`` and relays,
    closing without a reply when the backend refuses (guest not listening yet). Modes ``"eof"``
    (close before OK), ``"garbage"`` (reply a non-OK line) and ``"silent"`` (never answer)
    simulate broken devices. ``commands`` records every command line received.
    """

    def __init__(self, path: str, backends: dict[int, str], *, ok_port: int = 1073741824) -> None:
        self.path = path
        self.backends = backends
        self.ok_port = ok_port
        self.mode = "proxy"
        self.garbage = b"HELLO THERE\n"
        self.commands: list[bytes] = []
        self._silent: list[socket.socket] = []
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        self._relay = Relay(listener, self._dial, name="test-hybrid-peer")

    def _dial(self, conn: socket.socket, _peer: object) -> socket.socket:
        line = _read_line(conn)
        self.commands.append(line)
        if self.mode == "eof":
            raise ConnectionRefusedError("test peer: EOF before OK")
        if self.mode == "garbage":
            conn.sendall(self.garbage)
            raise ConnectionRefusedError("test peer: garbage reply")
        if self.mode == "silent":
            self._silent.append(conn.dup())
            raise ConnectionRefusedError("test peer: silent")
        verb, _, port = line.partition(b" ")
        if verb.upper() != b"CONNECT" or not port.isdigit() or int(port) not in self.backends:
            raise ConnectionRefusedError(f"test peer: bad command {line!r}")
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            backend.connect(self.backends[int(port)])
        except OSError:
            backend.close()
            raise
        conn.sendall(f"OK {self.ok_port}\n".encode())
        return backend

    def __enter__(self) -> HybridPeer:
        self._relay.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._relay.close()
        for sock in self._silent:
            sock.close()
        os.unlink(self.path)


STREAM_SERVICE = "vsockrpc.test.Stream"


def _echo(request_iterator: Iterator[bytes], _context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from request_iterator


def _download(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
    size, chunk = (int(x) for x in request.decode().split())
    block = b"\xa5" * chunk
    sent = 0
    while sent < size:
        n = min(chunk, size - sent)
        yield block[:n]
        sent += n


def _upload(request_iterator: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
    return str(sum(len(x) for x in request_iterator)).encode()


def _peer(request: bytes, context: grpc.ServicerContext) -> bytes:
    from vsockrpc.rpc import peer_address

    return repr(peer_address(context)).encode()


def register_stream_service(server: grpc.Server) -> None:
    """Test-only byte-stream methods (raw bytes, no protobuf): Echo, Download, Upload, Peer."""
    handlers = {
        "Echo": grpc.stream_stream_rpc_method_handler(_echo),
        "Download": grpc.unary_stream_rpc_method_handler(_download),
        "Upload": grpc.stream_unary_rpc_method_handler(_upload),
        "Peer": grpc.unary_unary_rpc_method_handler(_peer),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(STREAM_SERVICE, handlers),)
    )


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``: in-process test peers close their side of a
    finished connection on their own threads, a moment after the client has seen EOF."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
