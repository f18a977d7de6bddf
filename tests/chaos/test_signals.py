"""SIGTERM, SIGHUP and a double SIGINT to a foreground ``vsockrpc vm run`` of a real guest at
random points of its boot: whatever the moment, the launcher leaves no QEMU, no device, no run
directory and no name or CID taken.

``VSOCKRPC_CHAOS_TRIES`` sets the number of tries (default 21: seven of each kind; the soak
runs 100 double SIGINTs with ``VSOCKRPC_CHAOS_KINDS=double-SIGINT``), ``VSOCKRPC_CHAOS_SEED``
replays a sequence. The test reports every try that left something, then fails.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from tests.chaos.conftest import Runtime, assert_bystander_fine
from vsockrpc.vm import Vm

# What the interpreter itself prints when a SIGINT cuts its own start-up short (exit 1,
# before any vsockrpc code runs).
PYTHON_STARTUP = ("Could not import runpy module", "Fatal Python error: init_import_site")
KINDS = ("SIGTERM", "SIGHUP", "double-SIGINT")
TRIES = int(os.environ.get("VSOCKRPC_CHAOS_TRIES", "21"))
# A try takes a few seconds (interpreter start, QEMU start, cleanup); the soak runs longer.
pytestmark = pytest.mark.timeout(max(600, 30 * TRIES))

# What the launcher may end with: 130 interrupted and cleaned up; 0 the guest was already up
# and was powered off; -N the signal came before Python installed any handler (nothing
# existed yet); 1 with "Could not import runpy module": a SIGINT while the interpreter itself
# starts. What counts is that nothing is left, whatever the code.
CODES = (0, 130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP)


def _signal(proc: subprocess.Popen[str], kind: str, rng: random.Random) -> None:
    if kind == "double-SIGINT":
        proc.send_signal(signal.SIGINT)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, kind))


def _leftovers(runtime: Runtime, name: str) -> list[str]:
    found = []
    deadline = time.monotonic() + 15
    while runtime.vm_processes(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pids := runtime.reap(name):
        found.append(f"processes {pids}")
    if os.path.lexists(runtime.run_dir(name)):
        found.append("run directory")
    if name in runtime.listed():
        found.append("vm list entry")
    return found


def test_signals_at_random_points_of_a_real_boot(runtime: Runtime, bystander: Vm) -> None:
    seed = int(os.environ.get("VSOCKRPC_CHAOS_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    kinds = os.environ.get("VSOCKRPC_CHAOS_KINDS", ",".join(KINDS)).split(",")
    failures: list[str] = []
    reached_boot = 0
    for attempt in range(TRIES):
        kind = kinds[attempt % len(kinds)]
        name = f"sig{attempt}"
        proc = runtime.start(
            "vm", "run", "--quiet", "--image", str(runtime.image.path), "--name", name
        )
        # Short random delays: from interpreter start-up through QEMU start into the boot.
        time.sleep(rng.uniform(0.0, 3.0))
        reached_boot += os.path.exists(runtime.run_dir(name) / "state.json")
        _signal(proc, kind, rng)
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            failures.append(f"try {attempt} ({kind}): launcher hung after the signal")
        python_startup = proc.returncode == 1 and any(m in err for m in PYTHON_STARTUP)
        if proc.returncode not in CODES and not python_startup:
            failures.append(f"try {attempt} ({kind}): exit {proc.returncode}: {err.strip()}")
        elif proc.returncode in (0, 130) and "Traceback" in err:
            failures.append(f"try {attempt} ({kind}): traceback: {err.strip()}")
        if left := _leftovers(runtime, name):
            failures.append(f"try {attempt} ({kind}): left {', '.join(left)}")
    summary = f"seed {seed}: {len(failures)} problems in {TRIES} tries"
    print(f"{summary} ({reached_boot} signalled after QEMU had started)")
    assert not failures, summary + "\n" + "\n".join(failures)
    assert reached_boot > 0, "no try reached the boot: the delays are too short to test it"
    assert_bystander_fine(runtime, bystander)
