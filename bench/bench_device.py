#!/usr/bin/env python3
"""The userspace vsock device vs QEMU user networking, and the device alone.

Kept for existing command lines: runs ``vsockrpc bench device``, which writes a report
directory (report.md, raw.json, plots); see src/vsockrpc/bench/device.py for what it measures.

    bench/bench_device.py [--quick] [--out DIR] [--json-only]

``--skip-vm`` (the old flag) means ``--quick``: the device alone, no guest.
"""

from __future__ import annotations

import sys

from vsockrpc.cli.main import main

if __name__ == "__main__":
    args = ["--quick" if a == "--skip-vm" else a for a in sys.argv[1:]]
    sys.exit(main(["bench", "device", *args]))
