"""``vsockrpc bench``: run the benchmark suite (or named parts) and write a report directory;
``vsockrpc bench report RAW.json --out DIR`` rebuilds the report from its raw JSON."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import tempfile
from pathlib import Path
from typing import Any

from vsockrpc._stopsignals import interrupting

# vsockrpc.bench.PARTS, without importing it
_PARTS = ("relay", "rpc", "device", "forward", "vmvm", "agent", "boot")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``bench`` subcommand."""
    parser = sub.add_parser(
        "bench",
        help="run the benchmarks and write a report (Markdown, raw JSON, plots)",
        usage="%(prog)s [PART ...] [--quick] [--out DIR] [--json-only]\n"
        "       %(prog)s report RAW.json --out DIR",
        description=(
            "Run the benchmark suite, or the named parts (relay, rpc, device, forward, vmvm, "
            "agent, boot), and write DIR/report.md (machine, versions, each figure with "
            "min/median/max and ratios, which path it took), DIR/raw.json (every sample) and "
            "PNG plots when matplotlib is installed (pip install 'vsockrpc[bench]'). --quick: a "
            "short run of the parts that boot no guest (relay, rpc, device alone). 'bench report "
            "RAW.json --out DIR' rebuilds the report from a raw.json. A part that fails is named "
            "in the report and the exit status is 1; the other parts still run."
        ),
    )
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"one of {', '.join(_PARTS)}")
    parser.add_argument("--quick", action="store_true", help="a short run, no guest boots")
    parser.add_argument(
        "--out", metavar="DIR", type=Path, help="report directory (default ./bench-DATE)"
    )
    parser.add_argument("--json-only", action="store_true", help="write raw.json only")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        metavar="TEXT",
        help="a line to record in the report (e.g. what else ran); repeatable",
    )
    parser.set_defaults(func=_run, bench_parser=parser)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.bench_parser
    parts: list[str] = args.parts
    if parts[:1] == ["report"]:
        if len(parts) != 2 or args.out is None or args.quick:
            parser.error("usage: vsockrpc bench report RAW.json --out DIR")
        return _report(Path(parts[1]), args.out, json_only=args.json_only)
    unknown = [p for p in parts if p not in _PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r} (choose from {', '.join(_PARTS)}, or report)")
    if len(set(parts)) != len(parts):
        parser.error("a part is named twice")
    out: Path = args.out or Path(f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    created = _check_out(parser, out)

    from vsockrpc import bench

    argv = [*parts, *(["--quick"] if args.quick else [])]
    try:
        # SIGTERM/SIGHUP unwind like Ctrl-C: guests, servers and the work directory go away.
        with interrupting():
            raw = bench.run_suite(parts, quick=args.quick, progress=_progress, argv=argv)
    except BaseException:
        if created:  # the directory made for this run, still empty: nothing of the user's
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    raw["notes"] += args.note
    for path in bench.write_report(raw, out, json_only=args.json_only):
        print(path, flush=True)
    failed = bench.failed_parts(raw)
    for part in failed:  # the report has the rest; the exit status says it is incomplete
        print(
            f"vsockrpc: error: bench part {part['name']} failed: {part['failed']}", file=sys.stderr
        )
    return 1 if failed else 0


def _check_out(parser: argparse.ArgumentParser, out: Path) -> bool:
    """Make sure the report can be written before the suite runs (minutes): create ``out``
    (True if this call created it) and write a probe file in it, or exit 2 saying why."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: exists and is not a directory")
    parent = out.resolve().parent
    if not parent.is_dir():
        parser.error(f"--out {out}: {parent} does not exist")
    created = False
    try:
        if not out.is_dir():
            out.mkdir()
            created = True
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        parser.error(f"--out {out}: cannot write there: {err.strerror or err}")
    return created


def _report(raw_path: Path, out: Path, *, json_only: bool) -> int:
    from vsockrpc import bench
    from vsockrpc.errors import VsockRpcError

    try:
        raw = bench.load_raw(raw_path)
    except VsockRpcError as err:  # the user's file: a usage error (exit 2)
        parser_error = f"vsockrpc bench report: error: {err}"
        print(parser_error, file=sys.stderr)
        return 2
    _progress(f"rebuilding the report of {raw_path} in {out}")
    for path in bench.write_report(raw, out, json_only=json_only):
        print(path, flush=True)
    return 0
