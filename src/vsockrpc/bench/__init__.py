"""``vsockrpc bench``: the benchmark suite as a library, and its report.

- :func:`run_suite` — run the parts (``relay``, ``rpc``, ``device``, ``agent``, ``boot``) and
  return one raw result document (JSON data, every sample kept);
- :func:`write_report` — write ``raw.json``, ``report.md`` and, when matplotlib is importable
  (``pip install 'vsockrpc[bench]'``), PNG plots into a directory;
- :func:`load_raw` — read a ``raw.json`` back (``vsockrpc bench report`` rebuilds the report
  from it alone).

Each part module documents what it measures; every non-public name the parts use is imported in
:mod:`vsockrpc.bench._private`.
"""

from __future__ import annotations

from vsockrpc.bench._model import SCHEMA, failed_parts, validate
from vsockrpc.bench._suite import PARTS, QUICK_PARTS, run_suite
from vsockrpc.bench.report import load_raw, render, write_report

__all__ = [
    "PARTS",
    "QUICK_PARTS",
    "SCHEMA",
    "failed_parts",
    "load_raw",
    "render",
    "run_suite",
    "validate",
    "write_report",
]
