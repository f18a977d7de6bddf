"""``vsockrpc bench``: the quick run goes end to end and writes a well-formed report that its
raw JSON rebuilds exactly. No figure is asserted (no benchmark is a timed test), and the quick
run boots no guest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration._relay_helpers import wait_for
from vsockrpc.bench import QUICK_PARTS, SCHEMA, validate
from vsockrpc.errors import GuestError
from vsockrpc.vm.procs import alive, is_vm_process

pytestmark = pytest.mark.slow

QUICK_TIMEOUT = 900  # a loaded 2-core machine; the C++ reference may be compiled the first time


def _bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vsockrpc.cli.main", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(QUICK_TIMEOUT + 120)
def test_quick_run_writes_a_report_its_raw_json_rebuilds(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = _bench("--quick", "--out", str(out), timeout=QUICK_TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    # Progress: one line per step on stderr, naming each part.
    for part in QUICK_PARTS:
        assert f"[{part}] done in" in done.stderr

    raw = json.loads((out / "raw.json").read_text())
    assert raw["schema"] == SCHEMA
    assert validate(raw) == []
    assert [p["name"] for p in raw["parts"]] == list(QUICK_PARTS)
    assert raw["options"]["quick"] is True
    for key in ("cpu_model", "cores", "kernel", "qemu", "python", "grpcio", "date"):
        assert raw["machine"][key] not in ("", None), key
    for part in raw["parts"]:
        assert part["skipped"] is None, part["name"]
        assert part["figures"], part["name"]
        assert part["path"], part["name"]
    relay = next(p for p in raw["parts"] if p["name"] == "relay")
    relay_series = [list(f["series"]) for f in relay["figures"]]
    if shutil.which("g++") is not None:  # the same hop in C++ beside ours
        assert all(series[-1] == "relay-C++" for series in relay_series), relay_series
    else:
        assert any(note.startswith("no relay-C++ line: g++") for note in relay["notes"])
    device = next(p for p in raw["parts"] if p["name"] == "device")
    assert "--quick: the guest half (a TCG boot) was not run" in device["notes"]
    assert all(not f["id"].endswith((".h2g", ".rtt", ".sweep")) for f in device["figures"])

    report = (out / "report.md").read_text()
    for heading in ("# vsockrpc benchmark report", "## Machine", "## Summary"):
        assert heading in report
    for part in QUICK_PARTS:
        assert f"\n## {part}: " in report
    for part in raw["parts"]:
        for fig in part["figures"]:
            assert f"### {fig['title']}" in report
    assert "| min | median |" in report
    if "Plots: not drawn" not in report:
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert pngs, "the report says plots were drawn"
        for name in pngs:
            assert f"]({name})" in report
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = tmp_path / "again"
    rebuilt = _bench("report", str(out / "raw.json"), "--out", str(again), timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert (again / "report.md").read_text() == report
    assert json.loads((again / "raw.json").read_text()) == raw


@pytest.mark.timeout(QUICK_TIMEOUT + 120)
def test_agent_quick_measures_each_added_step_beside_the_raw_stream(tmp_path: Path) -> None:
    from vsockrpc.bench.agent import FLOOR_STEPS

    out = tmp_path / "agent"
    done = _bench("agent", "--quick", "--json-only", "--out", str(out), timeout=QUICK_TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    raw = json.loads((out / "raw.json").read_text())
    assert validate(raw) == []
    (agent,) = raw["parts"]
    floor = next(f for f in agent["figures"] if f["id"] == "agent.floor")
    assert list(floor["series"]) == ["raw stream, download", *FLOOR_STEPS]
    download = next(f for f in agent["figures"] if f["id"] == "agent.download")
    # The baseline is the download figure's own raw samples, round by round.
    assert floor["series"]["raw stream, download"] == download["series"]["raw stream"]
    for step in FLOOR_STEPS:
        assert len(floor["series"][step]) == 2 and all(r > 0 for r in floor["series"][step])


def test_bad_input_is_a_usage_error(tmp_path: Path) -> None:
    done = _bench("nosuchpart", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "unknown part 'nosuchpart'" in done.stderr
    assert "Traceback" not in done.stderr

    missing = tmp_path / "missing.json"
    done = _bench("report", str(missing), "--out", str(tmp_path / "y"))
    assert done.returncode == 2
    assert str(missing) in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "y").exists()

    # The report's directory is checked before the suite runs, not after it (a full run takes
    # half an hour): /proc takes no new directory
    done = _bench("relay", "--quick", "--out", "/proc/vsockrpc-bench-out")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        "--out /proc/vsockrpc-bench-out: cannot write there: No such file or directory"
    )
    assert "relay" not in done.stdout  # no part ran

    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"schema": "something else", "parts": []}')
    done = _bench("report", str(bogus), "--out", str(tmp_path / "z"))
    assert done.returncode == 2
    assert "not a vsockrpc bench result" in done.stderr


def _every_kind() -> dict[str, object]:
    """A raw document with one figure of each kind (the guest parts' sweep and phases too)."""
    from vsockrpc.bench import _model

    figures = [
        _model.figure("t.lat", "round trip", "latency", {"a": [1e-4, 2e-4], "b": [3e-4, 1e-4]}),
        _model.figure("t.rate", "stream", "rate", {"a": [100.0, 120.0], "b": [50.0]}, unit="MB/s"),
        _model.figure("t.time", "power-off", "time", {"a": [0.5]}, unit="s", pairs=[]),
        _model.figure(
            "t.sweep",
            "vs size",
            "sweep",
            {"a": [[1.0, 2.0], [3.0]], "b": [[2.0], [4.0]]},
            x=[64, 1 << 20],
            unit="MB/s",
        ),
        _model.figure(
            "t.phases",
            "phases",
            "phases",
            {"1 vCPU": [{"p": 1.0, "q": 2.0}], "2 vCPUs": [{"p": 1.5, "q": 2.5}]},
            phases=["p", "q"],
        ),
    ]
    part = _model.part_result("demo", "every kind", {"guest": "TCG"}, figures, notes=["n"])
    skipped = _model.skipped("boot", "boots", "--quick does not boot guests")
    return {
        "schema": SCHEMA,
        "machine": {"date": "d", "cores": 2},
        "options": {"argv": ["demo"], "quick": False, "parts": ["demo", "boot"]},
        "notes": ["busy"],
        "parts": [part, skipped],
    }


def test_every_figure_kind_renders_and_rebuilds(tmp_path: Path) -> None:
    from vsockrpc.bench import load_raw, render, write_report

    raw = _every_kind()
    assert validate(raw) == []
    write_report(raw, tmp_path / "a")
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| 1 MiB | 3.00 [3.00-3.00] | 4.00 [4.00-4.00] | 1.33 |" in report
    assert "| **total** | 3.00 [3.00-3.00] | 4.00 [4.00-4.00] | 1.33 |" in report
    assert "| stream | b ÷ a | 0.45 | 50.0 vs 110 MB/s |" in report
    assert "Skipped: --quick does not boot guests" in report
    assert "> busy" in report
    write_report(load_raw(tmp_path / "a" / "raw.json"), tmp_path / "b")
    assert (tmp_path / "b" / "report.md").read_text() == report
    # Without matplotlib the report says so instead of linking plots.
    assert "Plots: not drawn" in render(raw, plots=None)


def test_malformed_raw_documents_are_named() -> None:
    raw = _every_kind()
    raw["parts"][0]["figures"][3]["series"]["a"] = [[1.0]]  # type: ignore[index]
    assert validate(raw) == [
        "part 'demo' figure 't.sweep': series 'a' is malformed for kind 'sweep'"
    ]
    assert validate([]) == ["the document is not a JSON object"]


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (through /proc/<pid>/task/*/children)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += kids - found
            found |= kids
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_stopped_run_leaves_no_process_and_no_work_directory(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Stopped while its servers run: with SIGTERM/SIGHUP the run unwinds (servers stopped,
    work directory and the report directory it made removed); even SIGKILL leaves no server."""
    out = tmp_path / "report"
    # A short TMPDIR of our own (tmp_path would make the work directory's sockets too long).
    tmp = Path(tempfile.mkdtemp(prefix="vb-"))
    children: set[int] = set()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vsockrpc.cli.main",
                "bench",
                "relay",
                "--quick",
                "--out",
                str(out),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp)},
        )
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # wait until the relay's own server is up
                if "unary Addition calls per path" in line:
                    break
            else:
                pytest.fail(f"the relay part ended early: status {proc.wait(60)}: {line}")
            children = _children(proc.pid)
            assert children, "the relay part runs its servers as child processes"
            proc.send_signal(sig)
            status = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        assert status == -sig if sig is signal.SIGKILL else status == 130
        assert wait_for(lambda: not [pid for pid in children if alive(pid)], 30)
        if sig is not signal.SIGKILL:
            assert list(tmp.iterdir()) == []  # the suite's work directory
            assert not out.exists()  # made by this run, still empty
    finally:  # whatever failed above, nothing of this test stays behind
        for pid in children:  # still ours: a bench server (PIDs are recycled)
            if is_vm_process(pid, "vsockrpc"):  # alive, and still a vsockrpc process
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


class _GoodPart:
    TITLE = "a part that measures"

    @staticmethod
    def run(ctx: object) -> dict[str, object]:
        from vsockrpc.bench import _model

        series = {"a": [100.0, 120.0], "b": [50.0, 60.0]}
        fig = _model.figure("relay.t", "a stream", "rate", series, unit="MB/s")
        return _model.part_result("relay", _GoodPart.TITLE, {"transport": "t"}, [fig])


def _failing_part(error: BaseException) -> type:
    class Part:
        TITLE = "a part that fails"

        @staticmethod
        def run(ctx: object) -> dict[str, object]:
            raise error

    return Part


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            GuestError("guest stopped before the agent was ready"),
            "guest stopped before the agent was ready",
        ),
        (RuntimeError("the C++ client failed:\nboom"), "RuntimeError: the C++ client failed: boom"),
    ],
)
def test_a_failed_part_is_reported_and_the_other_parts_are_kept(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    said: str,
) -> None:
    # e.g. one guest of the boot part crashing while booting: the minutes the other parts took
    # are not thrown away, and the exit status still says the run is incomplete.
    from vsockrpc.bench import _suite
    from vsockrpc.cli.main import main

    parts = {"boot": _failing_part(error), "relay": _GoodPart}
    monkeypatch.setattr(_suite, "_module", lambda name: parts[name])
    out = tmp_path / "report"
    assert main(["bench", "boot", "relay", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"[boot] failed: {said}" in err
    assert "[relay] done in" in err  # the part after the failed one ran
    errors = [ln for ln in err.splitlines() if ln.startswith("vsockrpc: error:")]
    assert errors == [f"vsockrpc: error: bench part boot failed: {said}"]
    assert "Traceback" not in err

    raw = json.loads((out / "raw.json").read_text())
    assert validate(raw) == []
    boot, relay = raw["parts"]
    assert (boot["name"], boot["failed"], boot["figures"]) == ("boot", said, [])
    assert relay["failed"] is None and relay["figures"][0]["series"]["a"] == [100.0, 120.0]
    report = (out / "report.md").read_text()
    assert f"**Failed:** {said}" in report
    assert "> **Incomplete run:** boot failed; see the part's section." in report
    assert "| a stream | b ÷ a |" in report
    again = tmp_path / "again"  # rebuilt from the raw JSON alone
    assert main(["bench", "report", str(out / "raw.json"), "--out", str(again)]) == 0
    assert (again / "report.md").read_text() == report


@pytest.mark.timeout(120)
def test_an_interrupted_part_still_ends_the_run_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vsockrpc.bench import _suite
    from vsockrpc.cli.main import main

    ran = []

    class After(_GoodPart):
        @staticmethod
        def run(ctx: object) -> dict[str, object]:
            ran.append("relay")
            return _GoodPart.run(ctx)

    parts = {"boot": _failing_part(KeyboardInterrupt()), "relay": After}
    monkeypatch.setattr(_suite, "_module", lambda name: parts[name])
    before = set(Path(tempfile.gettempdir()).glob("vsockrpc-bench-*"))
    out = tmp_path / "report"
    assert main(["bench", "boot", "relay", "--out", str(out)]) == 130
    assert ran == []
    assert not out.exists()  # made for this run, removed
    assert set(Path(tempfile.gettempdir()).glob("vsockrpc-bench-*")) == before
