"""The checked-in stubs are exactly what scripts/gen_protos.py generates now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert generated, "generator produced nothing"
    checked_in = sorted(p.relative_to(ROOT / "src") for p in (ROOT / "src").rglob("*_pb2*"))
    assert generated == checked_in, "stub set differs: run python scripts/gen_protos.py"
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ROOT / "src" / rel).read_bytes(), (
            f"{rel} is stale: run python scripts/gen_protos.py"
        )


def test_addition_wire_names() -> None:
    """Package, service, method and field numbers stay those of the original C++ demo."""
    from vsockrpc.proto import vsock_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["VsockService"]
    assert service.full_name == "popovicu_vsock.VsockService"
    method = service.methods_by_name["Addition"]
    assert method.input_type.full_name == "popovicu_vsock.AdditionRequest"
    assert method.output_type.full_name == "popovicu_vsock.AdditionResponse"
    req = pb.AdditionRequest.DESCRIPTOR.fields_by_name
    assert (req["a"].number, req["b"].number) == (1, 2)
    assert pb.AdditionResponse.DESCRIPTOR.fields_by_name["c"].number == 1
    # int32 a=5, b=7 encodes as field 1 varint 5, field 2 varint 7.
    assert pb.AdditionRequest(a=5, b=7).SerializeToString() == b"\x08\x05\x10\x07"
