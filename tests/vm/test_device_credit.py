"""Credit with a real Linux guest: a guest socket whose buffer is smaller than the device's.

Linux keeps at most ``min(peer buf_alloc, its own buf_alloc)`` in flight and never asks for
credit, so the device must offer it within the guest's window, not its own. All AF_VSOCK
connects run inside the guest; the host side is a Unix listener at the hybrid socket's
``<path>_<port>``.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterator

import pytest

from vsockrpc.sdk import Guest
from vsockrpc.transport import unix as unix_transport
from vsockrpc.vm import Vm

PORT = 6100
MiB = 1 << 20

# Runs inside the guest: a 32 KiB socket buffer, SIZE bytes to the host, then the host's echo
# of them back; prints how many bytes came back, their crc32 and the crc32 of what it sent.
SMALL_BUFFER_CLIENT = """
import socket, sys, zlib
port, size = int(sys.argv[1]), int(sys.argv[2])
data = bytes(range(256)) * (size // 256)
with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.AF_VSOCK, socket.SO_VM_SOCKETS_BUFFER_SIZE, 32 * 1024)
    s.settimeout(60)
    s.connect((socket.VMADDR_CID_HOST, port))
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    crc, got = 0, 0
    while chunk := s.recv(65536):
        crc, got = zlib.crc32(chunk, crc), got + len(chunk)
print(got, crc, zlib.crc32(data), flush=True)
"""


@pytest.fixture(scope="module")
def guest(vm: Vm) -> Iterator[Guest]:
    with Guest(vm.address(), wait=120) as g:
        yield g


@pytest.mark.timeout(300)
def test_guest_socket_with_a_smaller_buffer_streams_both_ways(vm: Vm, guest: Guest) -> None:
    if vm.hybrid_socket is None:
        pytest.skip("the kernel's vhost-vsock serves this guest: the userspace device is not used")
    size = 4 * MiB
    received = bytearray()
    failures: list[BaseException] = []
    path = f"{vm.hybrid_socket}_{PORT}"
    srv = unix_transport.listen_path(path, backlog=1, mode=0o600)
    try:
        srv.settimeout(60)

        def echo() -> None:
            try:
                peer, _ = srv.accept()
                with peer:
                    peer.settimeout(60)
                    while chunk := peer.recv(1 << 20):
                        received.extend(chunk)
                    peer.sendall(received)
            except BaseException as err:  # raised in the test below
                failures.append(err)

        host = threading.Thread(target=echo)
        host.start()
        done = guest.run(["python3", "-c", SMALL_BUFFER_CLIENT, str(PORT), str(size)], timeout=120)
        host.join(90)
    finally:
        srv.close()
        os.unlink(path)
    assert not failures, failures
    assert not host.is_alive()
    assert done.ok, done.stderr.decode()[-500:]
    got, crc_back, crc_sent = (int(word) for word in done.stdout.split())
    assert len(received) == size == got  # every byte reached the host, and came back
    assert zlib.crc32(received) == crc_sent == crc_back
