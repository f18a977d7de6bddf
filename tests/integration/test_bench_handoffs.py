"""The device part's reference line, ``cpp/handoffs.cc``: built with g++ into the cache, it
times round trips between two processes and leaves no process behind, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration._relay_helpers import wait_for
from vsockrpc.bench import _cpp
from vsockrpc.bench.device import HANDOFFS_ONE, HANDOFFS_TWO, handoff_placements, handoffs
from vsockrpc.errors import VsockRpcError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        _cpp.gxx_missing() is not None, reason="needs g++ (scripts/setup installs it)"
    ),
]


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("VSOCKRPC_CACHE")
    os.environ["VSOCKRPC_CACHE"] = str(cache)
    try:
        steps: list[str] = []
        built = _cpp.build_handoffs(steps.append)
        assert steps == ["compiling the C++ hand-offs (once, then cached)"]
        assert _cpp.build_handoffs(steps.append) == built  # the second call: from the cache
        assert len(steps) == 1
    finally:
        if old is None:
            del os.environ["VSOCKRPC_CACHE"]
        else:
            os.environ["VSOCKRPC_CACHE"] = old
    assert built.is_relative_to(cache)
    return built


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; its new parent reaps it


@pytest.mark.timeout(60)
def test_it_times_every_round_trip(exe: Path) -> None:
    samples = handoffs(exe, 500)
    assert len(samples) == 500
    assert all(0 < s < 5 for s in samples)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args",
    [
        [],
        ["0"],
        ["-3"],
        ["12x"],
        ["10000001"],
        ["1", "2"],
        ["1", "0", "x"],
        ["1", "-1", "0"],
        ["1", "0", "1", "2"],
        ["1", "0", ""],
        ["1", "0", str(1 << 20)],
    ],
)
def test_a_bad_count_is_a_usage_error(exe: Path, args: list[str]) -> None:
    done = subprocess.run(
        [str(exe), *args], check=False, capture_output=True, text=True, timeout=10
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "usage: handoffs COUNT (1 to 10000000) [CPU CPU]\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("line", [HANDOFFS_TWO, HANDOFFS_ONE])
def test_each_placement_runs_where_it_says(exe: Path, line: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if line == HANDOFFS_TWO and len(cpus) < 2:
        pytest.skip("this process may use one CPU only")
    pair = handoff_placements()[line]
    assert pair == (cpus[0], cpus[1] if line == HANDOFFS_TWO else cpus[0])
    proc = subprocess.Popen([str(exe), "10000000", *map(str, pair)], stdout=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: bool(_children(proc.pid)), 10), "no second process"
        (child,) = _children(proc.pid)
        assert wait_for(lambda: os.sched_getaffinity(proc.pid) == {pair[0]}, 10)
        assert os.sched_getaffinity(child) == {pair[1]}
    finally:
        proc.kill()
        proc.wait()
    assert len(handoffs(exe, 200, pair)) == 200


def test_placements_on_a_single_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert handoff_placements() == {HANDOFFS_ONE: (3, 3)}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 1, 3})
    assert handoff_placements() == {HANDOFFS_TWO: (1, 3), HANDOFFS_ONE: (1, 1)}


@pytest.mark.timeout(30)
def test_a_cpu_it_may_not_use_is_one_error(exe: Path) -> None:
    usable = os.sched_getaffinity(0)
    absent = next(cpu for cpu in range(1024) if cpu not in usable)
    with pytest.raises(VsockRpcError) as caught:
        handoffs(exe, 10, (min(usable), absent))
    assert str(caught.value) == (
        f"device bench: the C++ hand-offs failed: handoffs: cannot run on CPU {absent}: "
        "Invalid argument"
    )


@pytest.mark.timeout(30)
def test_a_failure_is_one_error_naming_it(tmp_path: Path) -> None:
    fake = tmp_path / "handoffs"
    fake.write_text(
        "#!/bin/sh\necho 1000\necho 'handoffs: the round trips did not complete' >&2\nexit 1\n"
    )
    fake.chmod(0o700)
    with pytest.raises(VsockRpcError) as caught:
        handoffs(fake, 2)
    assert str(caught.value) == (
        "device bench: the C++ hand-offs failed: handoffs: the round trips did not complete"
    )
    short = tmp_path / "short"
    short.write_text("#!/bin/sh\necho 1000\n")
    short.chmod(0o700)
    with pytest.raises(VsockRpcError, match=r"failed: 1 of 2 round trips$"):
        handoffs(short, 2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_its_second_process_dies_with_it(exe: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen([str(exe), "10000000"], stdout=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: bool(_children(proc.pid)), 10), "no second process"
        (child,) = _children(proc.pid)
        time.sleep(0.1)  # mid-run
        proc.send_signal(sig)
        assert proc.wait(10) == -sig
        assert wait_for(lambda: not _running(child), 10), "its second process was left running"
    finally:
        proc.kill()
        proc.wait()
