"""The whole system on a real guest: image → QEMU (TCG here) → vsock device → agent as PID 1."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.vm.conftest import process_alive
from vsockrpc.agent import markers
from vsockrpc.bench.boot import floor_boot
from vsockrpc.errors import AgentError, GuestError
from vsockrpc.image import ImageInfo, build_image
from vsockrpc.image.agent import FLOOR_INIT_PATH
from vsockrpc.sdk import Guest
from vsockrpc.vm import Vm, launch


def test_addition_through_the_cli_reaches_the_guest(vm: Vm, vsockrpc_cli: list[str]) -> None:
    proc = subprocess.run(
        [*vsockrpc_cli, "add", "5", "7", "--target", str(vm.address()), "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Addition result: 5 + 7 = 12"
    deadline = time.monotonic() + 10
    while "Addition: 5 + 7 = 12" not in vm.console_text():
        assert time.monotonic() < deadline, vm.console_text()[-2000:]
        time.sleep(0.1)


def test_guest_runs_the_agent_as_pid1_on_its_vsock_port(vm: Vm) -> None:
    text = vm.console_text()
    assert markers.INIT_STARTED in text
    assert f"{markers.READY} on vsock:-1:{vm.port}" in text
    assert vm.running()


def test_second_build_is_a_cache_hit(guest_image: ImageInfo) -> None:
    start = time.monotonic()
    again = build_image()
    assert again.cache_hit
    assert again.path == guest_image.path
    assert again.manifest["files"] == guest_image.manifest["files"]
    assert time.monotonic() - start < 10


def test_second_boot_powers_off_cleanly_and_leaves_nothing(guest_image: ImageInfo) -> None:
    machine = launch(guest_image)
    pids = [machine.qemu.pid] + ([machine.device.pid] if machine.device else [])
    with machine:
        assert machine.timings.rpc_ready is not None
    assert machine.qemu.returncode == 0
    text = machine.console_text()
    assert f"{markers.AGENT_EXITED} with status 0" in text, text[-2000:]
    assert "powering off (status 0)" in text
    assert "Kernel panic" not in text
    assert not [pid for pid in pids if process_alive(pid)]
    assert not machine.run_dir.exists()


def test_bench_floor_boots_a_bare_grpcio_pid1_and_leaves_nothing(guest_image: ImageInfo) -> None:
    # The boot bench's floor: the same image with vsockrpc.guest.floor as PID 1. floor_boot
    # raises unless that PID 1 prints READY, which it does only once it listens.
    wall, cpu = floor_boot(guest_image)
    assert 0 < wall < 120
    assert 0 < cpu < 120
    assert not subprocess.run(
        ["pgrep", "-f", f"init={FLOOR_INIT_PATH}"], capture_output=True, check=False
    ).stdout  # its QEMU (whose -append names that init) is gone


# One static key flipped in a loop while the other vCPU context-switches through the code it
# patches. Linux patches through a temporary int3 (text_poke_bp); QEMU 7.2's multi-threaded TCG
# let a vCPU still run that int3 after the patch was done: every guest died (Oops: int3), most
# within 100 flips. The ping-pong's child exits when its parent is killed (EOF on its pipe).
STATIC_KEY_FLIPS = r"""
set -e
( while :; do :; done ) & spin=$!
python3 -c '
import os
r1, w1 = os.pipe(); r2, w2 = os.pipe()
if os.fork() == 0:
    os.close(w1)
    while os.read(r1, 1):
        os.write(w2, b"x")
    os._exit(0)
os.close(r1)
while True:
    os.write(w1, b"x"); os.read(r2, 1)
' & pingpong=$!
i=0
while [ $i -lt 300 ]; do
  echo 1 > /proc/sys/kernel/sched_schedstats; echo 0 > /proc/sys/kernel/sched_schedstats
  i=$((i+1))
done
kill $spin $pingpong
echo "flipped $i"
"""


@pytest.mark.timeout(300)
def test_two_vcpu_guest_survives_static_key_patching(guest_image: ImageInfo) -> None:
    with launch(guest_image, cpus=2) as machine, Guest(machine.address(), wait=60) as guest:
        assert guest.run(["nproc"], check=True).stdout == b"2\n"
        try:
            result = guest.run(["sh", "-c", STATIC_KEY_FLIPS], timeout=240)
        except AgentError as err:  # the guest died under the loop
            pytest.fail(f"{err}\n{machine.console_text()[-3000:]}")
        text = machine.console_text()
        assert "Oops" not in text, text[-3000:]
        assert result.exit_code == 0, result.stderr
        assert result.stdout == b"flipped 300\n"
        assert machine.running()


@pytest.mark.timeout(240)
def test_agent_crash_is_reported_not_a_hang(guest_image: ImageInfo) -> None:
    # The agent cannot bind this address: it exits non-zero; PID 1 reports and powers off.
    start = time.monotonic()
    with pytest.raises(GuestError, match="agent crashed") as info:
        launch(
            guest_image, append="vsockrpc.listen=unix:/nonexistent/agent.sock", ready_timeout=200
        )
    assert time.monotonic() - start < 120
    assert "status 1" in str(info.value)
    # the console outlives the run directory, for the user to read
    assert info.value.hint is not None
    kept = Path(info.value.hint.removeprefix("guest console: "))
    assert "agent exited with status 1" in kept.read_text()
    kept.unlink()


def test_image_build_out_copies_a_bootable_image(
    guest_image: ImageInfo, vsockrpc_cli: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "exported"
    proc = subprocess.run(
        [*vsockrpc_cli, "image", "build", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"image: {out} (cached;")
    for name, meta in guest_image.manifest["files"].items():
        assert (out / name).stat().st_size == meta["size"]
        assert (out / name).stat().st_ino != (guest_image.path / name).stat().st_ino
    assert json.loads((out / "manifest.json").read_text()) == guest_image.manifest
