"""The checked-in stubs are exactly what scripts/gen_protos.py generates now (runs protoc in a
subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _stubs(root: Path) -> list[Path]:
    """The stub sources under ``root`` (not the bytecode a checkout's imports leave beside)."""
    found = root.rglob("*_pb2*")
    return sorted(p.relative_to(root) for p in found if p.suffix in (".py", ".pyi"))


def test_checked_in_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    generated = _stubs(tmp_path)
    assert generated, "generator produced nothing"
    checked_in = _stubs(ROOT / "src")
    assert generated == checked_in, "stub set differs: run python scripts/gen_protos.py"
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ROOT / "src" / rel).read_bytes(), (
            f"{rel} is stale: run python scripts/gen_protos.py"
        )
