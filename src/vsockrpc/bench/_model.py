"""The raw-result schema shared by the parts, the report and ``raw.json``.

A part returns a :data:`PartResult` (plain JSON data, so the report can be rebuilt from the file
alone). Every figure keeps every sample; summaries are computed when the report is rendered.

Figure kinds:

- ``latency``: ``series`` maps a name to per-call seconds (shown in µs, with p99, as a CDF).
- ``rate``: ``series`` maps a name to per-run values in ``unit`` (e.g. MB/s), higher is better.
- ``time``: like ``rate`` but lower is better (seconds, per-call µs measured by a C++ client).
- ``sweep``: ``x`` is a list of message sizes in bytes; ``series`` maps a name to a list (one
  per x) of per-run values in ``unit``.
- ``phases``: ``phases`` names the stages in order; ``series`` maps a configuration to a list
  of runs, each ``{phase: seconds}``.

The first series of a figure is its baseline: ratios are ``median(series) / median(baseline)``.
"""

from __future__ import annotations

import math
from typing import Any

SCHEMA = "vsockrpc.bench/1"
KINDS = ("latency", "rate", "time", "sweep", "phases")

Figure = dict[str, Any]
PartResult = dict[str, Any]


def figure(fid: str, title: str, kind: str, series: dict[str, Any], **extra: Any) -> Figure:
    """One figure; ``extra`` carries ``unit``, ``x``, ``phases``, ``note``."""
    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}")
    return {"id": fid, "title": title, "kind": kind, "series": series, **extra}


def part_result(
    name: str,
    title: str,
    path: dict[str, str],
    figures: list[Figure],
    *,
    notes: list[str] | None = None,
    skipped: str | None = None,
    failed: str | None = None,
) -> PartResult:
    """``path``: which way the figures went (accelerator, vsock device, transport…)."""
    return {
        "name": name,
        "title": title,
        "path": path,
        "figures": figures,
        "notes": notes or [],
        "skipped": skipped,
        "failed": failed,
    }


def skipped(name: str, title: str, reason: str) -> PartResult:
    return part_result(name, title, {}, [], skipped=reason)


def failed(name: str, title: str, error: str) -> PartResult:
    """A part that stopped with an error: the run goes on, the report says why it has no
    figures (older raw documents have no ``failed`` key)."""
    return part_result(name, title, {}, [], failed=error)


def failed_parts(raw: dict[str, Any]) -> list[PartResult]:
    """The parts of a raw document that stopped with an error (see :func:`failed`)."""
    return [part for part in raw["parts"] if part.get("failed")]


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty list."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(len(ordered), rank) - 1]


def median(samples: list[float]) -> float:
    ordered = sorted(samples)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def validate(raw: Any) -> list[str]:
    """Problems with a raw result document (empty when it is well formed)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        return ["the document is not a JSON object"]
    if raw.get("schema") != SCHEMA:
        problems.append(f"schema is {raw.get('schema')!r}, expected {SCHEMA!r}")
    if not isinstance(raw.get("machine"), dict):
        problems.append("'machine' is missing or not an object")
    parts = raw.get("parts")
    if not isinstance(parts, list):
        return [*problems, "'parts' is missing or not a list"]
    for i, part in enumerate(parts):
        where = f"parts[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("name"), str):
            problems.append(f"{where} has no name")
            continue
        where = f"part {part['name']!r}"
        if not isinstance(part.get("figures"), list) or not isinstance(part.get("path"), dict):
            problems.append(f"{where} lacks 'figures' (list) or 'path' (object)")
            continue
        for fig in part["figures"]:
            problems.extend(_figure_problems(where, fig))
    return problems


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )


def _figure_problems(where: str, fig: Any) -> list[str]:
    if not isinstance(fig, dict) or fig.get("kind") not in KINDS:
        return [f"{where}: a figure has no valid kind"]
    label = f"{where} figure {fig.get('id')!r}"
    series = fig.get("series")
    if not isinstance(series, dict) or not series:
        return [f"{label}: no series"]
    kind = fig["kind"]
    for name, values in series.items():
        if kind == "sweep":
            x = fig.get("x")
            ok = (
                isinstance(x, list)
                and _numbers(x)
                and isinstance(values, list)
                and len(values) == len(x)
                and all(_numbers(v) and v for v in values)
            )
        elif kind == "phases":
            phases = fig.get("phases")
            ok = (
                isinstance(phases, list)
                and isinstance(values, list)
                and bool(values)
                and all(isinstance(run, dict) and _numbers(list(run.values())) for run in values)
            )
        else:
            ok = _numbers(values) and bool(values)
        if not ok:
            return [f"{label}: series {name!r} is malformed for kind {kind!r}"]
    return []
