"""Names and planted files as attacks on the launcher, next to a running guest.

Every target is a canary under this test's own temporary directory: code that treats a name as
a path, follows a planted symlink or trusts a forged ``state.json`` would destroy or signal
it. Afterwards the canaries are intact, the bystander guest still runs, and ``vm list`` shows
only it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.conftest import Runtime, alive, assert_bystander_fine
from vsockrpc.vm import Vm

pytestmark = pytest.mark.timeout(300)


def _one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("hint:")]
    assert len(lines) == 1 and lines[0].startswith("vsockrpc: error: "), proc.stderr
    return lines[0]


def _canary(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    canary = directory / "canary"
    canary.write_text("keep me")
    return canary


def _run(runtime: Runtime, *args: str) -> subprocess.CompletedProcess[str]:
    return runtime.cli("vm", "run", "--image", str(runtime.image.path), "--quiet", *args)


def test_a_name_is_never_a_path(runtime: Runtime, bystander: Vm, tmp_path: Path) -> None:
    victim = _canary(tmp_path / "victim")
    names = [
        str(tmp_path / "victim"),
        "..",
        ".",
        "../vms",
        f"../../{os.path.relpath(tmp_path / 'victim', runtime.root)}",
    ]
    for name in names:
        line = _one_line(_run(runtime, f"--name={name}"), 2)
        assert "VM name" in line, name
    assert "VM name" in _one_line(runtime.cli("vm", "stop", "--", names[0]), 2)
    assert victim.read_text() == "keep me"
    assert bystander.run_dir.is_dir() and (bystander.run_dir / "state.json").exists()
    assert set(runtime.listed()) == {"bystander"}
    assert_bystander_fine(runtime, bystander)


def test_the_bystanders_name_is_taken(runtime: Runtime, bystander: Vm) -> None:
    line = _one_line(_run(runtime, "--name", "bystander", "--no-wait"), 1)
    assert "a VM named bystander is already running or starting" in line
    assert_bystander_fine(runtime, bystander)


def test_planted_symlinks_are_never_followed(
    runtime: Runtime, bystander: Vm, tmp_path: Path
) -> None:
    victim = _canary(tmp_path / "victim")
    planted = [
        (runtime.root / "vms" / "evil", tmp_path / "victim"),  # a run dir
        (runtime.root / "names" / "evil2.lock", victim),  # a name lock
    ]
    free_cid = 4000 + os.getpid() % 1000
    (runtime.root / "cids").mkdir(exist_ok=True)
    planted.append((runtime.root / "cids" / f"{free_cid}.lock", victim))  # a CID lock
    for link, target in planted:
        link.symlink_to(target)
    try:
        assert "not created by vsockrpc" in _one_line(_run(runtime, "--name", "evil"), 1)
        assert "lock file" in _one_line(_run(runtime, "--name", "evil2"), 1)
        line = _one_line(_run(runtime, "--name", "evil3", "--cid", str(free_cid)), 1)
        assert "lock file" in line
        assert "no VM named" in _one_line(runtime.cli("vm", "stop", "evil"), 1)
        assert victim.read_text() == "keep me"
        assert set(runtime.listed()) == {"bystander"}
    finally:
        for link, _ in planted:
            link.unlink()
    runtime.assert_vm_gone("evil3")
    assert_bystander_fine(runtime, bystander)


def test_a_forged_state_file_signals_nothing(
    runtime: Runtime, bystander: Vm, tmp_path: Path
) -> None:
    # A process of ours standing in for "someone else's": a forged state.json names it.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        forged = runtime.root / "vms" / "forged"
        forged.mkdir()
        (forged / "state.json").write_text(
            json.dumps({"name": "forged", "cid": 5, "qemu_pid": sleeper.pid, "address": "x"})
        )
        (forged / ".owner").write_text("0" * 32 + "\n")
        assert set(runtime.listed()) == {"bystander"}
        assert "no VM named" in _one_line(runtime.cli("vm", "stop", "forged"), 1)
        assert alive(sleeper.pid), "a process named by a forged state file was signalled"
        assert (forged / "state.json").exists(), "a directory vsockrpc did not create went"
        (forged / "state.json").unlink()
        (forged / ".owner").unlink()
        forged.rmdir()
    finally:
        sleeper.kill()
        sleeper.wait(10)
    assert_bystander_fine(runtime, bystander)
