"""Snapshot a ready guest and restore it as new VMs (issue 11), on a real TCG guest.

One source guest per module: a file in its tmpfs and a background process, then
``vsockrpc vm snapshot``. Clones restored from it answer on their own CID and device and see
both; a corrupt snapshot is refused in one line with nothing started and nothing deleted; a
snapshot that runs out of disk is removed and the source keeps running."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import process_alive
from tests.vm.test_groups import ADD_CLIENT
from vsockrpc.errors import VmError
from vsockrpc.image import ImageInfo
from vsockrpc.sdk import Guest
from vsockrpc.vhost.hostproto import IDLE_EXIT
from vsockrpc.vm import Pool, Vm, launch, restore, snapshot_vm
from vsockrpc.vm.registry import list_vms
from vsockrpc.vm.restoring import restore_many
from vsockrpc.vm.runtime import groups_dir, runtime_dir

MARKER = "/dev/shm/snapshot-marker"


def run(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def source(guest_image: ImageInfo) -> Iterator[tuple[Vm, int]]:
    machine = launch(guest_image, name="snapsource", ready_timeout=180)
    try:
        with Guest(machine.address(), call_timeout=60) as g:
            g.write_bytes(MARKER, b"written before the snapshot")
            started = g.run(["sh", "-c", "sleep 100000 </dev/null >/dev/null 2>&1 & echo $!"])
            pid = int(started.stdout)
        yield machine, pid
    finally:
        machine.stop()


@pytest.fixture(scope="module")
def snapshot(source: tuple[Vm, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("snap") / "s"
    saved = run(
        [
            sys.executable,
            "-m",
            "vsockrpc.cli.main",
            "vm",
            "snapshot",
            source[0].name,
            "--out",
            str(out),
        ]
    )
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.startswith(f"snapshot {out}: ")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "ram.bin", "state.bin"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ram"]["free_bytes_zeroed"] > 0  # page cache dropped, free pages zeroed
    # RAM beside the stream (x-ignore-shared), sparse: only pages that are not zero use disk
    assert (out / "state.bin").stat().st_size < 4 << 20
    ram = out / "ram.bin"
    assert ram.stat().st_size == manifest["guest"]["memory_mib"] << 20
    assert ram.stat().st_blocks * 512 < ram.stat().st_size // 2
    return out


def test_source_resumes_and_the_clone_has_its_own_cid_file_and_process(
    source: tuple[Vm, int], snapshot: Path
) -> None:
    vm, pid = source
    with Guest(vm.address(), wait=30, call_timeout=60) as g:  # the source answers again
        assert g.read_bytes(MARKER) == b"written before the snapshot"
    with restore(snapshot) as clone:
        assert clone.cid != vm.cid
        assert clone.hybrid_socket != vm.hybrid_socket
        phases = clone.restore_phases()
        assert list(phases) == [
            "start qemu",
            "load state",
            "device re-plug",
            "agent answers",
            "fresh identity",
        ]
        with Guest(clone.address(), call_timeout=60) as g:
            assert g.read_bytes(MARKER) == b"written before the snapshot"
            alive = g.run(["sh", "-c", f"kill -0 {pid} && cat /proc/{pid}/cmdline"])
            assert alive.exit_code == 0, alive.stderr
            assert alive.stdout.split(b"\0")[:2] == [b"sleep", b"100000"]
        clone_pids = [clone.qemu.pid, clone.device.pid if clone.device else 0]
        run_dir = clone.run_dir
    assert not any(process_alive(p) for p in clone_pids)
    assert not run_dir.exists()
    with Guest(vm.address(), call_timeout=60) as g:  # the source is unaffected by the clone
        assert g.read_bytes(MARKER) == b"written before the snapshot"


def test_cli_restore_then_snapshot_with_stop(
    snapshot: Path, vsockrpc_cli: list[str], tmp_path: Path
) -> None:
    started = run([*vsockrpc_cli, "vm", "run", "--from", str(snapshot), "--detach", "--quiet"])
    assert started.returncode == 0, started.stderr
    name = started.stdout.split(":")[0].removeprefix("vm ")
    address = started.stdout.split("agent at ")[1].split(",")[0]
    try:
        with Guest(address, call_timeout=60) as g:
            assert g.read_bytes(MARKER) == b"written before the snapshot"
        out = tmp_path / "again"
        saved = run(
            [*vsockrpc_cli, "vm", "snapshot", name, "--out", str(out), "--stop", "--compress"]
        )
        assert saved.returncode == 0, saved.stderr
        assert "stopped" in saved.stdout and "MiB on disk" in saved.stdout
        assert (out / "manifest.json").is_file()
        assert (out / "ram.bin.zst").is_file() and not (out / "ram.bin").exists()
        assert name not in [r.name for r in list_vms()]
        # The compressed snapshot restores like any other, with what the first one held.
        again = run([*vsockrpc_cli, "vm", "run", "--from", str(out), "--detach", "--quiet"])
        assert again.returncode == 0, again.stderr
        name = again.stdout.split(":")[0].removeprefix("vm ")
        address = again.stdout.split("agent at ")[1].split(",")[0]
        with Guest(address, call_timeout=60) as g:
            assert g.read_bytes(MARKER) == b"written before the snapshot"
        assert run([*vsockrpc_cli, "vm", "stop", name], timeout=60).returncode == 0
    finally:
        if name in [r.name for r in list_vms()]:
            run([*vsockrpc_cli, "vm", "stop", name], timeout=60)


def test_a_corrupt_snapshot_is_refused(
    snapshot: Path, vsockrpc_cli: list[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(snapshot, bad)
    with (bad / "state.bin").open("r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = {r.name for r in list_vms()}
    refused = run([*vsockrpc_cli, "vm", "run", "--from", str(bad), "--detach"])
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert f"snapshot {bad} is corrupt: state.bin does not match its sha256" in lines[0]
    assert {r.name for r in list_vms()} == before
    assert sorted(p.name for p in bad.iterdir()) == ["manifest.json", "ram.bin", "state.bin"]


def test_disk_full_removes_the_partial_snapshot_and_the_guest_keeps_running(
    source: tuple[Vm, int], tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(VmError, match="migration failed"):
            snapshot_vm(source[0].name, small / "s")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
    with Guest(source[0].address(), wait=30, call_timeout=60) as g:
        assert g.read_bytes(MARKER) == b"written before the snapshot"


def test_three_clones_at_once_are_distinct_machines(source: tuple[Vm, int], snapshot: Path) -> None:
    pid = source[1]
    clones = restore_many(snapshot, 3, name="clone")
    try:
        assert sorted(c.name for c in clones) == ["clone-1", "clone-2", "clone-3"]
        assert len({c.cid for c in clones} | {source[0].cid}) == 4
        randoms, hostnames = set(), set()
        for clone in clones:
            with Guest(clone.address(), call_timeout=60) as g:
                assert g.read_bytes(MARKER) == b"written before the snapshot"
                alive = g.run(["sh", "-c", f"kill -0 {pid} && cat /proc/{pid}/cmdline"])
                assert alive.exit_code == 0, alive.stderr
                assert alive.stdout.split(b"\0")[:2] == [b"sleep", b"100000"]
                randoms.add(g.run(["head", "-c", "32", "/dev/urandom"], check=True).stdout)
                before = time.time_ns()
                guest_now = g.info().time_ns
                after = time.time_ns()
                assert before - 1_000_000_000 <= guest_now <= after + 1_000_000_000
                hostnames.add(g.info().hostname)
        assert len(randoms) == 3  # reseeded: identical RAM, different RNG output
        assert hostnames == {"clone-1", "clone-2", "clone-3"}
        victim, *others = clones
        os.kill(victim.qemu.pid, signal.SIGKILL)
        victim.qemu.wait(30)
        for clone in others:
            with Guest(clone.address(), call_timeout=60) as g:
                assert g.read_bytes(MARKER) == b"written before the snapshot"
    finally:
        for clone in clones:
            clone.stop()
    assert not any(c.run_dir.exists() for c in clones)


def host_gone(pid: int) -> None:
    """``pid`` ends within the group host's idle time (at once for a VM's own processes)."""
    deadline = time.monotonic() + IDLE_EXIT + 20
    while pid and process_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} outlived its VMs"
        time.sleep(0.05)


def test_clones_in_a_group_reach_each_other_by_cid(snapshot: Path) -> None:
    group = f"clones{os.getpid()}"
    clones = restore_many(snapshot, 2, name=f"grp{os.getpid()}", groups=[group])
    try:
        a, b = clones
        assert {r.name: r.groups for r in list_vms()}[b.name] == (group,)
        with Guest(b.address(), call_timeout=60) as g:  # the AF_VSOCK connect runs in clone b
            result = g.run(["python3", "-c", ADD_CLIENT, str(a.cid)], timeout=180)
        assert (result.exit_code, result.stdout) == (0, b"12\n"), result.stderr
    finally:
        for clone in clones:
            clone.stop()
    members = groups_dir(runtime_dir()) / group
    host_gone(clones[0].device.pid if clones[0].device else 0)
    assert [p.name for p in members.iterdir()] == ["host.log"]  # the clones' group host's
    shutil.rmtree(members)  # this test's own group (its name carries our pid)


def test_pool_hands_out_ready_unused_guests_and_closes_everything(snapshot: Path) -> None:
    group = f"pool{os.getpid()}"
    with Pool(snapshot, size=2, ready_timeout=180, groups=[group]) as pool:
        first, second = pool.acquire(timeout=240), pool.acquire(timeout=240)
        assert first is not second and first.cid != second.cid
        with Guest(second.address(), call_timeout=60) as g:  # pool guests share its group
            result = g.run(["python3", "-c", ADD_CLIENT, str(first.cid)], timeout=180)
        assert (result.exit_code, result.stdout) == (0, b"12\n"), result.stderr
        with first, Guest(first.address(), call_timeout=60) as g:
            assert g.read_bytes(MARKER) == b"written before the snapshot"
        third = pool.acquire(timeout=240)  # a replacement, never the stopped one
        assert third.qemu.pid not in (first.qemu.pid, second.qemu.pid)
        with Guest(third.address(), call_timeout=60) as g:
            assert g.read_bytes(MARKER) == b"written before the snapshot"
        assert pool.restored >= 3
        started = [second, third]
    pids = [p for vm in started for p in (vm.qemu.pid, vm.device.pid if vm.device else 0)]
    for pid in pids:
        host_gone(pid)  # the pool's group host exits once it serves no VM
    assert not any(vm.run_dir.exists() for vm in started)
    members = groups_dir(runtime_dir()) / group
    assert [p.name for p in members.iterdir()] == ["host.log"]  # the pool group host's
    shutil.rmtree(members)


@pytest.mark.timeout(600)
def test_a_grouped_vm_snapshots_and_its_clone_joins_the_same_host(
    guest_image: ImageInfo, tmp_path: Path
) -> None:
    """A VM served by its group's host is saved (its device unplugged and re-plugged in the
    host) and keeps answering; a clone restored into the group joins the same host and calls
    the source's Addition by CID."""
    group = f"snapgrp{os.getpid()}"
    origin = launch(guest_image, name=f"sg{os.getpid()}", groups=(group,), ready_timeout=300)
    clones: list[Vm] = []
    try:
        snapshot_vm(origin.name, tmp_path / "s")
        with Guest(origin.address(), call_timeout=60) as g:
            assert g.run(["true"], timeout=60).exit_code == 0  # resumed, vsock re-plugged
        clones = restore_many(tmp_path / "s", 1, name=f"sgc{os.getpid()}", groups=[group])
        assert origin.device is not None and clones[0].device is not None
        assert clones[0].device.pid == origin.device.pid  # one process for the group
        with Guest(clones[0].address(), call_timeout=60) as g:
            result = g.run(["python3", "-c", ADD_CLIENT, str(origin.cid)], timeout=180)
        assert (result.exit_code, result.stdout) == (0, b"12\n"), result.stderr
    finally:
        for vm in [*clones, origin]:
            vm.stop()
    host_gone(origin.device.pid if origin.device else 0)
    members = groups_dir(runtime_dir()) / group
    assert [p.name for p in members.iterdir()] == ["host.log"]
    shutil.rmtree(members)
