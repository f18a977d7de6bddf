"""The kvstore example (examples/kvstore) runs as its README says: its host program builds
the image from the example's spec, boots it and talks to KeyValue with its own stubs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kvstore"

pytestmark = pytest.mark.timeout(600)


def test_the_example_host_program_runs_end_to_end() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "host.py")],
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("image kvstore: ")
    assert "health of kvstore.v1.KeyValue: SERVING" in lines
    assert "get fruit/kiwi -> green (version 1)" in lines
    assert "scan fruit/ -> fruit/apple, fruit/kiwi" in lines
    assert (
        "put of 70000 bytes -> RESOURCE_EXHAUSTED: value of 70000 bytes exceeds "
        "KVSTORE_MAX_VALUE=65536" in lines
    )
