"""``vsockrpc bench``: the quick run goes end to end and writes a well-formed report that its
raw JSON rebuilds exactly. No figure is asserted (no benchmark is a timed test), and the quick
run boots no guest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vsockrpc.bench import QUICK_PARTS, SCHEMA, validate

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

    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"schema": "something else", "parts": []}')
    done = _bench("report", str(bogus), "--out", str(tmp_path / "z"))
    assert done.returncode == 2
    assert "not a vsockrpc bench result" in done.stderr
