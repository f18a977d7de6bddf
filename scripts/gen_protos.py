#!/usr/bin/env python3
"""Regenerate the checked-in gRPC/protobuf stubs from every ``*.proto`` under ``src/vsockrpc``.

A proto sits beside the code it belongs to (``vsockrpc/proto/`` for the seed's Addition,
``vsockrpc/agent/v1/`` for the agent contract) and its stubs are written next to it.
Usage: ``python scripts/gen_protos.py [--out DIR]`` (default: in place). Needs the pinned
grpcio-tools and mypy-protobuf from requirements/constraints.txt. Protos are compiled with
``src/`` as the include root, so generated imports are package-absolute (``vsockrpc.agent...``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE_DIR = SRC / "vsockrpc"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency only

    # protoc finds the mypy-protobuf plugin (protoc-gen-mypy) on PATH, next to this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(PACKAGE_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{SRC}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            *[str(p) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for path in sorted(Path(tmp).rglob("*_pb2*")):
            rel = path.relative_to(tmp)
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            written.append(dest)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=SRC, help="output root (default: src/)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path.relative_to(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
