"""The launcher's lifecycle with a stand-in QEMU (tests/integration/fake_qemu.py) and the real
userspace device: name claims, signals to a foreground ``vm run``, ``vm list``/``vm stop``
after a process of the VM was killed, QEMU's own last words. No guest: the vm and chaos tiers
cover the same with real ones."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._relay_helpers import wait_for
from tests.integration.test_vm_bad_input import fake_image, one_error_line
from vsockrpc.image.debs import host_arch
from vsockrpc.vm.procs import alive

# What the interpreter itself prints when a SIGINT cuts its own start-up short (exit 1,
# before any vsockrpc code runs).
PYTHON_STARTUP = ("Could not import runpy module", "Fatal Python error: init_import_site")
CLI = [sys.executable, "-m", "vsockrpc.cli.main"]
FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")
pytestmark = pytest.mark.timeout(120)


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.runtime = root / "rt"
        self.image = fake_image(root / "img", host_arch())
        bin_dir = root / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "qemu-system-x86_64"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_QEMU} "$@"\n')
        wrapper.chmod(0o755)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "VSOCKRPC_RUNTIME_DIR": str(self.runtime),
            "VSOCKRPC_ACCEL": "tcg",
        }

    def argv(self, *args: str) -> list[str]:
        if args[:2] == ("vm", "run"):
            return [*CLI, *args, "--image", str(self.image)]
        return [*CLI, *args]

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**self.env, **env},
        )

    def start(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**self.env, **env},
        )

    def state(self, name: str, timeout: float = 30.0) -> dict[str, object]:
        path = self.runtime / "vms" / name / "state.json"
        deadline = time.monotonic() + timeout
        while True:
            try:
                return dict(json.loads(path.read_text()))
            except (OSError, ValueError):
                assert time.monotonic() < deadline, f"no {path}"
                time.sleep(0.05)

    def processes(self) -> list[int]:
        """PIDs (not zombies) whose command line names this runtime dir: QEMU and devices."""
        marker = str(self.runtime).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker in (entry / "cmdline").read_bytes():
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if stat != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
        return found

    def assert_nothing_left(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.processes(), "processes of the VM left behind"
        vms = self.runtime / "vms"
        assert not (vms.exists() and list(vms.iterdir())), list(vms.iterdir())


def gone(pid: int, timeout: float = 10.0) -> bool:
    """``pid`` has exited (or is a zombie) within ``timeout`` seconds."""
    return wait_for(lambda: not alive(pid), timeout)


@pytest.fixture
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp"))  # short: socket paths <= 107 bytes
    e = Env(root)
    try:
        yield e
    finally:
        for pid in e.processes():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_two_runs_with_one_name_one_wins(env: Env) -> None:
    procs = [env.start("vm", "run", "--detach", "--no-wait", "--name", "race") for _ in range(2)]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    line = one_error_line(subprocess.CompletedProcess([], loser[0], loser[1], loser[2]))
    assert "a VM named race is already running or starting" in line
    listed = env.run("vm", "list").stdout.splitlines()
    assert len([ln for ln in listed if ln.startswith("race ")]) == 1
    assert "running" in next(ln for ln in listed if ln.startswith("race "))
    rows = json.loads(env.run("vm", "list", "--json").stdout)
    assert [(r["name"], r["state"], r["groups"]) for r in rows] == [("race", "running", [])]
    assert rows[0]["cid"] >= 3 and rows[0]["address"].startswith("hvsock:")
    stopped = env.run("vm", "stop", "race")
    assert stopped.returncode == 0, stopped.stderr
    assert "powered off" in stopped.stdout
    env.assert_nothing_left()


def test_killed_device_is_dead_in_list_and_stop_cleans_up(env: Env) -> None:
    assert env.run("vm", "run", "--detach", "--no-wait", "--name", "d").returncode == 0
    state = env.state("d")
    os.kill(int(str(state["device_pid"])), signal.SIGKILL)
    assert gone(int(str(state["device_pid"])))
    line = next(ln for ln in env.run("vm", "list").stdout.splitlines() if ln.startswith("d "))
    assert "dead (device exited)" in line
    stopped = env.run("vm", "stop", "d")
    assert stopped.returncode == 0, stopped.stderr
    env.assert_nothing_left()


def test_killed_qemu_is_dead_and_stop_says_so(env: Env) -> None:
    assert env.run("vm", "run", "--detach", "--no-wait", "--name", "q").returncode == 0
    state = env.state("q")
    os.kill(int(str(state["qemu_pid"])), signal.SIGKILL)
    assert gone(int(str(state["qemu_pid"])))
    line = next(ln for ln in env.run("vm", "list").stdout.splitlines() if ln.startswith("q "))
    assert line.split()[2] == "dead"
    stopped = env.run("vm", "stop", "q")
    assert stopped.returncode == 0, stopped.stderr
    assert "was already dead" in stopped.stdout
    assert "powered off" not in stopped.stdout
    env.assert_nothing_left()
    assert env.run("vm", "list").stdout.strip() == "no VMs"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_power_off_a_foreground_vm(env: Env, sig: signal.Signals) -> None:
    proc = env.start("vm", "run", "--no-wait", "--quiet", "--name", "fg")
    env.state("fg")
    time.sleep(0.3)  # in the foreground loop
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"{sig.name}: powering the guest off" in err
    env.assert_nothing_left()


def test_sigterm_while_waiting_for_the_first_rpc_stops_at_once(env: Env) -> None:
    """The agent printed its readiness line but does not answer yet: the launcher polls for a
    gRPC connection through the device, and a stop request must cut that wait short (it
    went unnoticed for a whole connection attempt)."""
    proc = env.start(
        "vm", "run", "--quiet", "--timeout", "60", "--name", "mute", FAKE_QEMU_MODE="mute-agent"
    )
    env.state("mute")
    time.sleep(1.5)  # past the console wait, into the connection attempts
    assert proc.poll() is None, proc.communicate()
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - start
    print(f"TOOK {took:.2f}")
    assert proc.returncode == 130, err
    assert took < 5.0, f"the launcher took {took:.1f} s to notice SIGTERM"
    env.assert_nothing_left()


def test_sigkilled_launcher_takes_qemu_along(env: Env) -> None:
    proc = env.start("vm", "run", "--no-wait", "--quiet", "--name", "orphan")
    state = env.state("orphan")
    proc.kill()
    proc.communicate(timeout=10)
    assert gone(int(str(state["qemu_pid"]))), "QEMU outlived its SIGKILLed launcher"
    line = next(ln for ln in env.run("vm", "list").stdout.splitlines() if ln.startswith("orphan"))
    assert "dead" in line
    assert env.run("vm", "stop", "orphan").returncode == 0
    env.assert_nothing_left()


def test_signals_at_random_points_of_the_boot_leave_nothing(env: Env) -> None:
    rng = random.Random(int(os.environ.get("VSOCKRPC_CHAOS_SEED", "0")) or None)
    for attempt in range(12):
        kind = ("SIGTERM", "SIGHUP", "double SIGINT")[attempt % 3]
        # --timeout: the fake guest never gets ready, so the launcher is in its boot wait
        proc = env.start("vm", "run", "--quiet", "--timeout", "60", "--name", f"b{attempt}")
        time.sleep(rng.uniform(0.0, 1.5))
        if kind == "double SIGINT":
            proc.send_signal(signal.SIGINT)
            time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, kind))
        _, err = proc.communicate(timeout=60)
        # 130: interrupted and cleaned up; -N: the signal came before Python set its handlers
        # (nothing was created yet); what counts is that nothing is left either way
        codes = (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP)
        # 1 with PYTHON_STARTUP: a Ctrl-C while the interpreter itself starts (none of ours ran)
        python_startup = proc.returncode == 1 and any(m in err for m in PYTHON_STARTUP)
        assert proc.returncode in codes or python_startup, (attempt, kind, proc.returncode, err)
        if proc.returncode == 130:  # a Ctrl-C while Python imports is its own business
            assert "Traceback" not in err, err
        env.assert_nothing_left()


def test_qemu_dying_shows_its_own_last_line(env: Env) -> None:
    proc = env.run("vm", "run", "--quiet", "--timeout", "30", FAKE_QEMU_MODE="die")
    line = one_error_line(proc)
    assert proc.returncode == 1
    assert "cannot set up guest memory 'pc.ram': Cannot allocate memory" in line
    env.assert_nothing_left()
