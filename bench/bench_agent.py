#!/usr/bin/env python3
"""Guest agent: exec round trip, file transfers vs a raw stream (--quick: a local agent).

Kept for existing command lines: runs ``vsockrpc bench agent``, which writes a report
directory (report.md, raw.json, plots); see src/vsockrpc/bench/agent.py for what it measures.

    bench/bench_agent.py [--quick] [--out DIR] [--json-only]

``--vm`` (the old flag) is accepted and ignored: the full part boots the guest image.
"""

from __future__ import annotations

import sys

from vsockrpc.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "agent", *[a for a in sys.argv[1:] if a != "--vm"]]))
