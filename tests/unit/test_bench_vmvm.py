"""The ``vmvm`` bench part without guests: the probe's ``X`` request and reply as the C probe
(tests/vm/guest_probe.c) lays them out, the checks on a reply, and the report of the part's
figures (user networking is the baseline; the vsock path's ratios sit beside it)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from vsockrpc.bench import PARTS, QUICK_PARTS, _model, render, validate, vmvm
from vsockrpc.bench._context import Context
from vsockrpc.cli import bench as cli_bench
from vsockrpc.errors import VsockRpcError

USER_NET, VSOCK = vmvm.PATHS


class FakeControl:
    """Guest B's probe connection: records what the host sends, answers ``reply``."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sent = b""

    def __enter__(self) -> FakeControl:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def settimeout(self, _t: float) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def recv(self, n: int) -> bytes:
        chunk, self.reply = self.reply[:1], self.reply[1:]  # one byte at a time: short reads
        return chunk[:n]


def reply(status: int, crc_local: int, crc_peer: int, ns: list[int]) -> bytes:
    return struct.pack(f"<iIII{len(ns)}Q", status, crc_local, crc_peer, len(ns), *ns)


def run_op(answer: bytes, target: vmvm.Target, op: bytes, n: int) -> tuple[list[int], bytes]:
    fake = FakeControl(answer)
    ns = vmvm.run_op(lambda: fake, target, op, n)  # type: ignore[arg-type, return-value]
    return ns, fake.sent


def test_request_matches_the_probe_layout() -> None:
    tcp = vmvm.Target(b"t", vmvm.GATEWAY, 40123)
    assert vmvm.request(tcp, b"s", 1 << 26) == (
        b"Xt"
        + (0x0A000202).to_bytes(4, "little")
        + (40123).to_bytes(4, "little")
        + b"s"
        # n: u64 little-endian, no padding anywhere (the probe reads field by field)
        + (1 << 26).to_bytes(8, "little")
    )
    assert str(tcp) == "tcp:10.0.2.2:40123"
    assert str(vmvm.Target(b"v", 43, 5000)) == "vsock:43:5000"


def test_a_reply_gives_the_guest_timings() -> None:
    target = vmvm.Target(b"v", vmvm.CID_A, 5000)
    ns, sent = run_op(reply(0, 0, 0, [1500, 1700, 1600]), target, b"E", 3)
    assert ns == [1500, 1700, 1600]
    assert sent == vmvm.request(target, b"E", 3)
    assert run_op(reply(0, 9, 9, [123456]), target, b"S", 4096)[0] == [123456]


@pytest.mark.parametrize(
    ("answer", "op", "message"),
    [
        (
            reply(110, 0, 0, []),
            b"s",
            "guest B's s 1024 to vsock:43:5000 failed: Connection timed out",
        ),
        (reply(-1, 0, 0, []), b"g", "failed: the peer ended the stream early"),
        (reply(0, 1, 2, [5]), b"G", "guest B's G 1024 to vsock:43:5000: crc32 mismatch"),
        (reply(0, 0, 0, [5, 6]), b"s", "2 timings in the reply"),
        (reply(0, 0, 0, [5])[:10], b"s", "guest B's probe did not answer b's': EOF after 10 of 16"),
    ],
)
def test_a_failed_run_is_an_error_naming_it(answer: bytes, op: bytes, message: str) -> None:
    with pytest.raises(VsockRpcError, match=r"^vmvm bench: ") as err:
        run_op(answer, vmvm.Target(b"v", vmvm.CID_A, 5000), op, 1024)
    assert message in str(err.value)


def _raw(part: dict[str, Any]) -> dict[str, Any]:
    return {"schema": _model.SCHEMA, "machine": {}, "options": {}, "notes": [], "parts": [part]}


def test_the_report_puts_the_paths_side_by_side() -> None:
    figures = vmvm.figures(
        {USER_NET: [10.0, 12.0, 11.0], VSOCK: [30.0, 33.0]},
        {USER_NET: [20.0], VSOCK: [25.0]},
        {USER_NET: [1e-3, 2e-3, 1.5e-3], VSOCK: [5e-4, 1e-3, 6e-4]},
        64 << 20,
        {f"{USER_NET}: QEMU A": [300.0, 320.0, 310.0], f"{VSOCK}: device A": [40.0, 60.0]},
    )
    part = _model.part_result(vmvm.NAME, vmvm.TITLE, vmvm.PATH, figures)
    raw = _raw(part)
    assert validate(raw) == []
    report = render(raw, plots=None)
    ratio = f"{VSOCK} ÷ {USER_NET}"
    assert f"| guest B → guest A stream, 64 MiB | {ratio} | 2.86 | 31.5 vs 11.0 MB/s |" in report
    assert f"| guest A → guest B stream, 64 MiB | {ratio} | 1.25 | 25.0 vs 20.0 MB/s |" in report
    assert (
        f"| guest B ↔ guest A 64-byte echo round trip | {ratio} | 0.40 | 600 vs 1500 µs p50 |"
        in (report)
    )
    assert (
        "Path: guests: TCG" in report and "user net (slirp port forward, TCP): guest B →" in report
    )
    assert "### CPU per 64-byte round trip, by process" in report
    assert f"| {VSOCK}: device A | 2 | 40.0 | 50.0 | 60.0 |" in report


def test_the_part_is_in_the_suite_but_boots_nothing_quick(tmp_path: Path) -> None:
    assert vmvm.NAME in PARTS and vmvm.NAME not in QUICK_PARTS
    assert cli_bench._PARTS == PARTS  # the CLI's copy (it does not import vsockrpc.bench)
    quick = vmvm.run(Context(quick=True, progress=lambda _line: None, workdir=tmp_path))
    assert quick["skipped"] == "--quick boots no guest (this part boots two)"
    assert quick["figures"] == []
