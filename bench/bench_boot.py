#!/usr/bin/env python3
"""Boot phases from `vm run` to the first answered RPC.

Kept for existing command lines: runs ``vsockrpc bench boot``, which writes a report
directory (report.md, raw.json, plots); see src/vsockrpc/bench/boot.py for what it measures.

    bench/bench_boot.py [--quick] [--out DIR] [--json-only]
"""

from __future__ import annotations

import sys

from vsockrpc.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "boot", *sys.argv[1:]]))
