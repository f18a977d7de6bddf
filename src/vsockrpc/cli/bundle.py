"""``vsockrpc bundle -o FILE``: the single-file guest agent (see :mod:`vsockrpc.bundle`)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from vsockrpc.bundle import DEFAULT_PYTHONS, build_bundle
from vsockrpc.cli._output import step


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``bundle``."""
    parser = sub.add_parser(
        "bundle",
        help="build the single-file guest agent",
        description="Write one executable file that runs the guest agent on any x86_64 Linux "
        "with Python >= 3.11: as init= (PID 1) or as a service (`FILE --listen ADDRESS`, "
        "default vsock:-1:9999). It carries the guest side of vsockrpc and manylinux wheels of "
        "grpcio and protobuf for each --python version, extracted once into a cache directory.",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    parser.add_argument(
        "--python",
        action="append",
        metavar="X.Y",
        help="CPython version to carry wheels for; repeatable "
        f"(default {' '.join(DEFAULT_PYTHONS)})",
    )
    parser.add_argument(
        "--wheel-dir",
        type=Path,
        metavar="DIR",
        help="take wheels from DIR only (offline); default: pip download into a cache",
    )
    parser.add_argument("--offline", action="store_true", help="use cached wheels only")
    parser.add_argument(
        "--spec",
        type=Path,
        metavar="FILE",
        help="image spec (vsockrpc.toml): carry its services, pip wheels and guest config",
    )
    parser.set_defaults(func=_bundle, parser=parser)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The bad input found before anything is downloaded or built (exit 2)."""
    from vsockrpc.errors import PayloadError
    from vsockrpc.payload import Target

    pythons = tuple(args.python or DEFAULT_PYTHONS)
    for python in pythons:
        try:
            Target(python)
        except PayloadError as err:
            parser.error(f"--python {python}: {err}")
    output: Path = args.output
    if output.is_dir():
        parser.error(f"--output {output}: is a directory")
    if output.parent.exists():  # a missing one is made, like mkdir -p
        if not output.parent.is_dir():
            parser.error(f"--output {output}: {output.parent} is not a directory")
        try:  # the file is written beside its place, then renamed: that directory must take it
            with tempfile.TemporaryFile(dir=output.parent):
                pass
        except OSError as err:
            parser.error(f"--output {output}: cannot write there: {err.strerror or err}")
    return pythons


def _bundle(args: argparse.Namespace) -> int:
    pythons = _check(args.parser, args)
    spec = None
    if args.spec is not None:
        from vsockrpc.payload import load_spec

        spec = load_spec(args.spec)  # SpecError (exit 2) before anything is built
    with step(f"building {args.output} for Python {', '.join(pythons)}"):
        info = build_bundle(
            args.output,
            pythons=pythons,
            wheel_dir=args.wheel_dir,
            offline=args.offline,
            spec=spec,
        )
    print(
        f"{info.path}: {info.size / 2**20:.1f} MiB, digest {info.digest[:16]}, "
        f"{len(info.wheels)} wheels",
        file=sys.stderr,
    )
    return 0
