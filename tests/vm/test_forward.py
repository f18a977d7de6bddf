"""Forwarding on a real guest: host → guest to an HTTP server in the guest (fetched with urllib
on the host), guest → host to a host Unix echo socket (reached by an AF_VSOCK client that runs
inside the guest), both with concurrent connections through the real device."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_forward import EchoServer
from vsockrpc.sdk import Guest, Stdout
from vsockrpc.vm import Vm

HTTP_PORT = 8080
EXPOSE_PORT = 5000

# ``python3 -m http.server``'s server and handler, listening on AF_VSOCK instead of TCP.
HTTP_SERVER = """
import http.server, socket, sys
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_VSOCK
    request_queue_size = 64  # socketserver's 5 would refuse (RST) a burst of connects
    def server_bind(self):
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "guest", self.server_address[1]
handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=sys.argv[2])
server = Server((socket.VMADDR_CID_ANY, int(sys.argv[1])), handler)
print("serving", flush=True)
server.serve_forever()
"""

# N concurrent AF_VSOCK connections to the host (CID 2); each sends its block, half-closes,
# and checks the echo. Runs inside the guest only.
VSOCK_CLIENT = """
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
results = [None] * n
def one(i):
    block = bytes([i % 256]) * (100_000 + i)
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect((socket.VMADDR_CID_HOST, port))
        sender = threading.Thread(target=lambda: (s.sendall(block), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
        sender.join()
    results[i] = bytes(got) == block
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(bool(r) for r in results), "of", n, "echoed", flush=True)
sys.exit(0 if all(results) else 1)
"""


@pytest.fixture(scope="module")
def guest(vm: Vm) -> Iterator[Guest]:
    with Guest(vm.address(), wait=120) as g:
        yield g


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        data: bytes = response.read()
        return data


@pytest.mark.timeout(300)
def test_host_to_guest_http_server_concurrent_requests(guest: Guest) -> None:
    files = {f"f{i}.bin": os.urandom(4096 + i * 65536) for i in range(6)}
    guest.makedirs("/tmp/www")
    for name, data in files.items():
        guest.write_bytes(f"/tmp/www/{name}", data)
    argv = ["python3", "-c", HTTP_SERVER, str(HTTP_PORT), "/tmp/www"]
    with guest.exec_stream(argv) as server:
        events = iter(server)
        assert any(isinstance(e, Stdout) and b"serving" in e.data for e in events)
        with guest.forward("tcp:127.0.0.1:0", to=HTTP_PORT) as fwd:
            base = f"http://{str(fwd.listen_address).removeprefix('tcp:')}"
            names = sorted(files) * 3
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda n: _fetch(f"{base}/{n}"), names))
            assert [hashlib.sha256(g).hexdigest() for g in got] == [
                hashlib.sha256(files[n]).hexdigest() for n in names
            ]
            assert fwd.failures == 0
            # Our userspace device takes each connection itself: no relay in between.
            on_our_device = fwd.target.scheme == "hvsock"
            assert fwd.passed_connections == (len(names) if on_our_device else 0)
        server.signal(15)


@pytest.mark.timeout(300)
def test_forward_to_a_guest_port_nobody_listens_on_keeps_listening(guest: Guest) -> None:
    with guest.forward("tcp:127.0.0.1:0", to=HTTP_PORT + 1) as fwd:
        url = f"http://{str(fwd.listen_address).removeprefix('tcp:')}/"
        for _ in range(2):
            with pytest.raises(OSError):  # closed without a reply (RemoteDisconnected)
                _fetch(url)
        deadline = time.monotonic() + 10
        while fwd.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fwd.failures == 2
        assert fwd.last_error is not None and "OK" in fwd.last_error


@pytest.mark.timeout(300)
def test_guest_to_host_expose_of_a_unix_echo_socket(guest: Guest, tmp_path: Path) -> None:
    app = EchoServer(str(tmp_path / "echo.sock"))
    try:
        with guest.expose(f"unix:{app.path}", port=EXPOSE_PORT) as exp:
            result = guest.run(["python3", "-c", VSOCK_CLIENT, str(EXPOSE_PORT), "8"], timeout=120)
            assert (result.exit_code, result.stdout, result.stderr) == (
                0,
                b"8 of 8 echoed\n",
                b"",
            )
            assert exp.failures == 0
            # Only what is exposed: another host port refuses the guest.
            other = guest.run(["python3", "-c", VSOCK_CLIENT, str(EXPOSE_PORT + 1), "1"])
            assert (other.exit_code, other.stdout) == (1, b"0 of 1 echoed\n")
            assert b"ConnectionResetError" in other.stderr  # refused at once (RST)
    finally:
        app.close()
