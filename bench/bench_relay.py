#!/usr/bin/env python3
"""Relay overhead: grpcio through the relay hop vs a direct Unix socket.

Kept for existing command lines: runs ``vsockrpc bench relay``, which writes a report
directory (report.md, raw.json, plots); see src/vsockrpc/bench/relay.py for what it measures.

    bench/bench_relay.py [--quick] [--out DIR] [--json-only]
"""

from __future__ import annotations

import sys

from vsockrpc.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "relay", *sys.argv[1:]]))
