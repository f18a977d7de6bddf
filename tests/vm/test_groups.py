"""VM↔VM on real guests: three guests on our device, A and B in one group, C in another.

A and B are served by one process, their group's device host (B's first group is A's), so
their traffic crosses no socket; C is served by its own group's host, and B, also a member of
C's group, reaches C across the two processes.

B calls A's Addition at ``vsock:<CID of A>:9999`` from inside B and A's access log names B's
CID; C (sharing no group with A) and a CID nobody has are refused at once; 16 MiB cross each way
between A and B, checked by sha256 on both ends, and the listener sees the caller's real CID;
the agent admits group members only when its VM was started with ``trust_group``.
All AF_VSOCK connects run inside the guests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.vm.conftest import process_alive
from vsockrpc.errors import VmError
from vsockrpc.image import ImageInfo
from vsockrpc.sdk import Guest, Stdout
from vsockrpc.vhost.hostproto import IDLE_EXIT
from vsockrpc.vm import Vm, launch
from vsockrpc.vm.registry import list_vms
from vsockrpc.vm.runtime import groups_dir, runtime_dir
from vsockrpc.vm.vsockdev import HostedDevice

GROUP = f"g{os.getpid()}"
OTHER = f"{GROUP}-other"
STREAM_PORT = 7100
MIB16 = 16 << 20

# Run inside a guest: Addition at vsock:CID:9999 through vsockrpc's own client.
ADD_CLIENT = """
import sys
from vsockrpc import rpc
from vsockrpc.proto import vsock_service_pb2 as pb, vsock_service_pb2_grpc as pb_grpc
with rpc.channel(f"vsock:{sys.argv[1]}:9999") as ch:
    print(pb_grpc.VsockServiceStub(ch).Addition(pb.AdditionRequest(a=5, b=7), timeout=60).c)
"""

# Run inside a guest: the agent's System.Ping at vsock:CID:9999; prints OK or the status code.
PING_CLIENT = """
import sys, grpc
from vsockrpc import rpc
from vsockrpc.agent.v1 import agent_pb2 as pb, agent_pb2_grpc as pb_grpc
with rpc.channel(f"vsock:{sys.argv[1]}:9999") as ch:
    try:
        pb_grpc.SystemStub(ch).Ping(pb.PingRequest(payload=b"hi"), timeout=60)
        print("OK")
    except grpc.RpcError as err:
        print(err.code().name)
"""

# Run inside a guest: a raw AF_VSOCK connect; prints how it ended and how long it took.
RAW_CONNECT = """
import socket, sys, time
start = time.monotonic()
with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
    s.settimeout(20)
    try:
        s.connect((int(sys.argv[1]), int(sys.argv[2])))
        outcome = "connected"
    except OSError as err:
        outcome = type(err).__name__
print(outcome, round(time.monotonic() - start, 3))
"""

# Run inside a guest: one stream of N bytes each way (a seeded pseudo-random block), written
# and read at once; prints the peer's CID (listener side), sha256 of what was sent and of what
# was received.
STREAM = """
import hashlib, random, socket, sys, threading
role, n = sys.argv[1], int(sys.argv[3])
block = random.Random(role).randbytes(n)
if role == "listen":
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as srv:
        srv.bind((socket.VMADDR_CID_ANY, int(sys.argv[2])))
        srv.listen(1)
        print("listening", flush=True)
        conn, (peer_cid, _port) = srv.accept()
else:
    conn = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    conn.settimeout(120)
    conn.connect((int(sys.argv[4]), int(sys.argv[2])))
    peer_cid = int(sys.argv[4])
def send():
    conn.sendall(block)
    conn.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send)
sender.start()
got = hashlib.sha256()
received = 0
while chunk := conn.recv(1 << 16):
    got.update(chunk)
    received += len(chunk)
sender.join()
conn.close()
print("peer", peer_cid, "sent", hashlib.sha256(block).hexdigest(), "got", got.hexdigest(),
      received, flush=True)
"""


def _boot(image: ImageInfo, name: str, groups: tuple[str, ...], trust: bool = False) -> Vm:
    return launch(image, name=name, groups=groups, trust_group=trust, wait=False, ready_timeout=300)


@pytest.fixture(scope="module")
def trio(guest_image: ImageInfo) -> Iterator[tuple[Vm, Vm, Vm]]:
    """A (group GROUP, trusts it), B (GROUP), C (OTHER only): booted together."""
    tag = os.getpid()
    vms: list[Vm] = []
    try:
        vms.append(_boot(guest_image, f"a{tag}", (GROUP,), trust=True))
        vms.append(_boot(guest_image, f"b{tag}", (GROUP, OTHER)))
        vms.append(_boot(guest_image, f"c{tag}", (OTHER,)))
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda vm: vm.wait_ready(300), vms))
        yield vms[0], vms[1], vms[2]
    finally:
        pids = [pid for vm in vms for pid in (vm.qemu.pid, vm.device.pid if vm.device else 0)]
        for vm in vms:
            vm.stop()
        # The group hosts exit by themselves once they serve no VM (IDLE_EXIT seconds).
        deadline = time.monotonic() + IDLE_EXIT + 20
        while [pid for pid in pids if pid and process_alive(pid)]:
            assert time.monotonic() < deadline, "a VM process or group host outlived its VMs"
            time.sleep(0.1)
        assert not [vm.run_dir for vm in vms if vm.run_dir.exists()]
        # Each device removed its own membership (socket and pid file), each host its socket
        # and pid file; the hosts' logs stay.
        for group in (GROUP, OTHER):
            members = groups_dir(runtime_dir()) / group
            assert [p.name for p in members.iterdir()] == ["host.log"]
            shutil.rmtree(members)  # this test's own group (its name carries our pid)


def _run(vm: Vm, *argv: str, timeout: float = 180) -> str:
    with Guest(vm.address(), wait=60) as guest:
        result = guest.run(["python3", "-c", *argv], timeout=timeout)
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def device_log(vm: Vm) -> str:
    """What the process serving ``vm``'s device logged (its group host's log)."""
    assert isinstance(vm.device, HostedDevice)
    return vm.device.host_log.read_text()


def test_members_of_one_first_group_share_one_device_process(trio: tuple[Vm, Vm, Vm]) -> None:
    a, b, c = trio
    assert a.device is not None and b.device is not None and c.device is not None
    assert a.device.pid == b.device.pid != c.device.pid
    assert {r.name: r.device_alive for r in list_vms()}[b.name] is True
    assert f"guest CID {b.cid}" in device_log(b)


def test_vm_list_shows_the_groups(trio: tuple[Vm, Vm, Vm]) -> None:
    a, b, c = trio
    groups = {r.name: r.groups for r in list_vms()}
    assert groups[a.name] == (GROUP,) and groups[b.name] == (GROUP, OTHER)
    assert groups[c.name] == (OTHER,)
    listing = subprocess.run(
        [sys.executable, "-m", "vsockrpc.cli.main", "vm", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert any(a.name in ln and GROUP in ln for ln in listing.splitlines()), listing


@pytest.mark.timeout(300)
def test_a_member_calls_another_members_addition_by_cid(trio: tuple[Vm, Vm, Vm]) -> None:
    a, b, _c = trio
    assert _run(b, ADD_CLIENT, str(a.cid)) == "12\n"
    assert f"Addition: 5 + 7 = 12 (from vsock:{b.cid}:" in a.console_text()


@pytest.mark.timeout(300)
def test_vms_sharing_no_group_are_refused_at_once(trio: tuple[Vm, Vm, Vm]) -> None:
    a, _b, c = trio
    for source, target in ((c, a.cid), (a, c.cid), (a, 4_000_000)):
        outcome, seconds = _run(source, RAW_CONNECT, str(target), "9999").split()
        assert outcome == "ConnectionResetError", (source.name, target, outcome)
        assert float(seconds) < 1.0  # a reset, not the kernel's 2 s connect timeout
    assert "not in a shared group" in device_log(a)


@pytest.mark.timeout(600)
def test_16_mib_each_way_between_two_members(trio: tuple[Vm, Vm, Vm]) -> None:
    a, b, _c = trio
    with Guest(a.address(), wait=60) as guest_a:
        argv = ["python3", "-c", STREAM, "listen", str(STREAM_PORT), str(MIB16)]
        with guest_a.exec_stream(argv) as listener:
            out = bytearray()
            events = iter(listener)
            for event in events:
                if isinstance(event, Stdout):
                    out += event.data
                    if b"listening" in out:
                        break
            dialer = _run(b, STREAM, "dial", str(STREAM_PORT), str(MIB16), str(a.cid), timeout=400)
            for event in events:
                if isinstance(event, Stdout):
                    out += event.data
    listened = out.decode().split("listening\n", 1)[1].split()
    dialed = dialer.split()
    # peer CID, sent digest, received digest, bytes received
    assert listened[1] == str(b.cid)  # the listener sees the caller's real CID
    assert listened[3] == dialed[5] and dialed[3] == listened[5]  # what one sent, the other got
    assert listened[6] == dialed[6] == str(MIB16)


@pytest.mark.timeout(300)
def test_the_agent_admits_members_only_when_trusted(trio: tuple[Vm, Vm, Vm]) -> None:
    a, b, _c = trio
    assert _run(b, PING_CLIENT, str(a.cid)) == "OK\n"  # A was started with trust_group
    assert _run(a, PING_CLIENT, str(b.cid)) == "PERMISSION_DENIED\n"  # B trusts the host only


@pytest.mark.timeout(300)
def test_a_killed_member_is_refused_at_once_and_the_others_carry_on(
    trio: tuple[Vm, Vm, Vm],
) -> None:
    """Last in the module: kill -9 B's QEMU. Its device leaves the group host (the host serves A
    on) and the group; A's connects to B's CID are refused at once, and A and C keep working."""
    a, b, c = trio
    b.qemu.kill()
    b.qemu.wait(30)
    assert b.device is not None
    deadline = time.monotonic() + 30
    while list((groups_dir(runtime_dir()) / GROUP).glob(f"{b.cid}.*")):
        assert time.monotonic() < deadline, "B's device did not leave its group"
        time.sleep(0.05)
    with pytest.raises(VmError, match="dropped this VM's device"):
        b.device.check()  # QEMU's end of vhost-user closed: the host told B's launcher
    assert process_alive(b.device.pid), "the host still serves A"
    outcome, seconds = _run(a, RAW_CONNECT, str(b.cid), "9999").split()
    assert (outcome, float(seconds) < 1.0) == ("ConnectionResetError", True)
    for vm in (a, c):
        assert _run(vm, "print('alive')") == "alive\n"
