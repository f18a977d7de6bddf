"""The guest agent on a real guest: QEMU (TCG here) → vsock device → agent as PID 1's child.

Everything goes through the host-side address of the booted guest (``vm.address()``), so each
byte crosses the real virtio-vsock device. The shutdown test boots its own guest.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.agent_harness import sha256_file, stty_sizes_across_resize
from vsockrpc import rpc
from vsockrpc.agent.v1 import agent_pb2 as pb
from vsockrpc.agent.v1 import agent_pb2_grpc as pb_grpc
from vsockrpc.errors import AgentError
from vsockrpc.image import ImageInfo
from vsockrpc.sdk import Exited, Guest, Stdout
from vsockrpc.vm import Vm, launch

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def guest(vm: Vm) -> Iterator[Guest]:
    with Guest(vm.address(), wait=120) as g:
        yield g


def _rss(guest: Guest, pid: int) -> int:
    for line in guest.read_bytes(f"/proc/{pid}/status").splitlines():
        if line.startswith(b"VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in the guest's /proc")


def test_exec_stdin_both_streams_exit_codes_and_signals(guest: Guest) -> None:
    result = guest.run(["sh", "-c", "tr a-z A-Z; echo err >&2; exit 9"], input=b"in guest\n")
    assert (result.exit_code, result.stdout, result.stderr) == (9, b"IN GUEST\n", b"err\n")
    with guest.exec_stream(["sleep", "60"]) as proc:
        proc.signal(signal.SIGTERM)
        assert list(proc)[-1] == Exited(exit_code=None, signal=signal.SIGTERM)
    assert guest.run(["sh", "-c", "kill -KILL $$"]).signal == signal.SIGKILL


def test_bad_input_then_still_serving(guest: Guest) -> None:
    with pytest.raises(AgentError) as err:
        guest.run(["/no/such/binary"])
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(AgentError) as err:
        guest.run(["true"], cwd="/no/such/dir")
    assert err.value.code == "NOT_FOUND"
    assert guest.run(["true"]).exit_code == 0


@pytest.mark.timeout(600)
def test_200mib_output_streams_with_flat_agent_rss(guest: Guest) -> None:
    agent_pid = guest.info().agent_pid
    total = 200 * MIB
    received = 0
    samples: list[int] = []
    with guest.exec_stream(["head", "-c", str(total), "/dev/zero"]) as proc:
        for event in proc:
            if isinstance(event, Stdout):
                before = received
                received += len(event.data)
                if before // (20 * MIB) != received // (20 * MIB):
                    samples.append(_rss(guest, agent_pid))
    assert received == total
    assert proc.exited == Exited(exit_code=0, signal=None)
    assert len(samples) >= 9
    baseline = samples[0]
    growth = max(samples) - baseline
    assert growth < 32 * MIB, f"agent RSS grew by {growth / MIB:.1f} MiB: {samples}"


def test_pty_stty_size_after_resize(guest: Guest) -> None:
    output, proc = stty_sizes_across_resize(guest, (25, 90), (50, 160), settle=0.5)
    assert b"25 90" in output and b"50 160" in output
    assert proc.exited == Exited(exit_code=0, signal=None)


@pytest.mark.timeout(600)
def test_64mib_file_and_tree_up_and_down(vm: Vm, guest: Guest, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for i in range(64):
            f.write(hashlib.sha512(str(i).encode()).digest() * (MIB // 64))
    guest.put(big, "/tmp/agent-test/big.bin")
    remote_sum = guest.run(["sha256sum", "/tmp/agent-test/big.bin"], check=True).stdout
    assert remote_sum.split()[0].decode() == sha256_file(big)
    guest.get("/tmp/agent-test/big.bin", tmp_path / "big.back")
    assert sha256_file(tmp_path / "big.back") == sha256_file(big)
    # Both went over raw vsock data channels, not in-band (the agent logs to the console).
    console = vm.console_text()
    assert "'/tmp/agent-test/big.bin' came over a data channel" in console
    assert "'/tmp/agent-test/big.bin' went over a data channel" in console
    guest.remove("/tmp/agent-test/big.bin")

    tree = tmp_path / "tree"
    (tree / "x" / "y").mkdir(parents=True)
    (tree / "x" / "y" / "deep.txt").write_text("deep\n")
    (tree / "top.bin").write_bytes(os.urandom(200_000))
    (tree / "empty").mkdir()
    guest.put(tree, "/tmp/agent-test/tree")
    listing = guest.run(["find", "/tmp/agent-test/tree", "-type", "f"], check=True).stdout
    assert sorted(listing.split()) == [
        b"/tmp/agent-test/tree/top.bin",
        b"/tmp/agent-test/tree/x/y/deep.txt",
    ]
    guest.get("/tmp/agent-test/tree", tmp_path / "tree.back")
    for rel in ("top.bin", "x/y/deep.txt"):
        assert (tmp_path / "tree.back" / rel).read_bytes() == (tree / rel).read_bytes()
    assert (tmp_path / "tree.back" / "empty").is_dir()
    guest.remove("/tmp/agent-test", recursive=True)


def test_cut_upload_leaves_no_partial_file(vm: Vm, guest: Guest) -> None:
    guest.makedirs("/tmp/cut")
    sent = threading.Event()

    def parts() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=pb.UploadHeader(path=b"/tmp/cut/file", size=64 * MIB))
        for _ in range(4):
            yield pb.UploadRequest(data=bytes(MIB))
        sent.set()
        threading.Event().wait(60)

    with rpc.channel(vm.address()) as channel:
        future = pb_grpc.FilesStub(channel).Upload.future(parts())
        assert sent.wait(60)
        time.sleep(1.0)
        future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=30)
    deadline = time.monotonic() + 30
    while guest.listdir("/tmp/cut") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert guest.listdir("/tmp/cut") == []
    assert not guest.exists("/tmp/cut/file")


def test_time_sync_from_the_host(guest: Guest) -> None:
    guest.run(["date", "-s", "@1000000000"], check=True)  # 2001: far off
    assert abs(guest.info().time_ns / 1e9 - 1_000_000_000) < 60
    offset = guest.sync_time()
    assert offset < -(time.time() - 1_000_000_100)
    assert abs(guest.info().time_ns - time.time_ns()) < 5e9


def test_peer_outside_the_allow_list_is_refused(vm: Vm, guest: Guest) -> None:
    """A second agent in the guest admitting only CID 5: the host (CID 2) is refused."""
    port = 7777
    with guest.exec_stream(
        ["python3", "-m", "vsockrpc.guest", "--listen", f"vsock:-1:{port}"],
        env={"VSOCKRPC_AGENT_ALLOWED_CIDS": "5", "PATH": "/usr/bin:/bin"},
        inherit_env=True,
    ) as second:
        with Guest(vm.address(port), wait=120) as other:
            with pytest.raises(AgentError) as err:
                other.run(["true"])
            assert err.value.code == "PERMISSION_DENIED"
        second.signal(signal.SIGTERM)
        assert list(second)[-1] == Exited(exit_code=0, signal=None)  # stopped gracefully


def test_loopback_peer_inside_the_guest_is_refused(vm: Vm, guest: Guest) -> None:
    """A client inside the guest over vsock loopback (CID 1) is not the host: refused."""
    # The image loads vsock_loopback (vsockrpc.image.modules.GUEST_MODULES): CID 1 is reachable.
    assert guest.exists("/sys/module/vsock_loopback")
    script = (
        "import grpc\n"
        "from vsockrpc import rpc\n"
        "from vsockrpc.agent.v1 import agent_pb2 as pb, agent_pb2_grpc as pbg\n"
        "with rpc.channel('vsock:1:%d') as ch:\n"
        "    try:\n"
        "        pbg.SystemStub(ch).Ping(pb.PingRequest(), timeout=60)\n"
        "        print('ADMITTED')\n"
        "    except grpc.RpcError as e:\n"
        "        print(e.code().name)\n"
    )
    result = guest.run(["python3", "-c", script % vm.port], timeout=120)
    assert result.stdout.strip() == b"PERMISSION_DENIED", result.stderr.decode(errors="replace")


@pytest.mark.timeout(400)
def test_shutdown_powers_the_vm_off(guest_image: ImageInfo) -> None:
    machine = launch(guest_image, ready_timeout=200)
    with machine:
        with Guest(machine.address(), wait=120) as g:
            g.shutdown()
        assert machine.qemu.wait(timeout=120) == 0
        assert "powering off" in machine.console_text()
