"""Render a raw result document (``raw.json``) as ``report.md`` plus plots.

The report is a pure function of the raw document (and of whether matplotlib is importable, which
it states): ``vsockrpc bench report raw.json --out DIR`` rebuilds the same ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vsockrpc.bench import _model
from vsockrpc.bench._model import Figure, median, percentile
from vsockrpc.errors import VsockRpcError

__all__ = ["load_raw", "plot_file", "render", "write_report"]

_MACHINE_ROWS = (
    ("date", "date"),
    ("cpu_model", "CPU"),
    ("cores", "cores"),
    ("kernel", "kernel"),
    ("qemu", "QEMU"),
    ("python", "Python"),
    ("grpcio", "grpcio"),
    ("protobuf", "protobuf"),
    ("vsockrpc", "vsockrpc"),
    ("/dev/kvm", "/dev/kvm"),
    ("/dev/vhost-vsock", "/dev/vhost-vsock"),
    ("load_before", "load average before (1/5/15 min)"),
    ("load_after", "load average after (1/5/15 min)"),
)


def load_raw(path: Path) -> dict[str, Any]:
    """Read and check a raw document; a malformed one raises naming the file and the problem."""
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise VsockRpcError(f"{path}: {err.strerror or err}") from err
    except ValueError as err:
        raise VsockRpcError(f"{path}: not JSON ({err})") from err
    problems = _model.validate(raw)
    if problems:
        raise VsockRpcError(f"{path}: not a vsockrpc bench result: {problems[0]}")
    return dict(raw)


def plot_file(fig: Figure) -> str:
    return str(fig["id"]).replace(".", "-").replace("/", "-") + ".png"


def fmt(value: float) -> str:
    a = abs(value)
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _series_table(fig: Figure) -> list[str]:
    series: dict[str, list[float]] = fig["series"]
    base_name = _baseline(fig)
    if fig["kind"] == "latency":
        scaled = {k: [v * 1e6 for v in vals] for k, vals in series.items()}
        b50, b99 = percentile(scaled[base_name], 0.5), percentile(scaled[base_name], 0.99)
        rows = [
            [
                name,
                str(len(v)),
                fmt(min(v)),
                fmt(percentile(v, 0.5)),
                fmt(percentile(v, 0.99)),
                fmt(max(v)),
                _ratio(percentile(v, 0.5), b50),
                _ratio(percentile(v, 0.99), b99),
            ]
            for name, v in scaled.items()
        ]
        header = ["µs", "n", "min", "median", "p99", "max", f"p50 ÷ {base_name}", "p99 ÷ same"]
        return _table(header, rows)
    unit = fig.get("unit", "")
    base = median(series[base_name])
    compare = bool(_pairs(fig))  # e.g. two directions of one device: no ratio between them
    rows = [
        [name, str(len(v)), fmt(min(v)), fmt(median(v)), fmt(max(v))]
        + ([_ratio(median(v), base)] if compare else [])
        for name, v in series.items()
    ]
    header = [unit, "n", "min", "median", "max"] + ([f"÷ {base_name}"] if compare else [])
    return _table(header, rows)


def _sweep_table(fig: Figure) -> list[str]:
    names = list(fig["series"])
    base = names[0]
    header = ["message size", *(f"{n} ({fig.get('unit', '')}, median [min-max])" for n in names)]
    header += [f"{n} ÷ {base}" for n in names[1:]]
    rows = []
    for i, x in enumerate(fig["x"]):
        cells = [_size(int(x))]
        meds = {n: median(fig["series"][n][i]) for n in names}
        for n in names:
            runs = fig["series"][n][i]
            cells.append(f"{fmt(meds[n])} [{fmt(min(runs))}-{fmt(max(runs))}]")
        cells += [_ratio(meds[n], meds[base]) for n in names[1:]]
        rows.append(cells)
    return _table(header, rows)


def _phases_table(fig: Figure) -> list[str]:
    configs: dict[str, list[dict[str, float]]] = fig["series"]
    names = list(configs)
    header = ["phase (s)", *(f"{c} median [min-max], n={len(configs[c])}" for c in names)]
    if len(names) > 1:
        header += [f"{c} ÷ {names[0]}" for c in names[1:]]
    rows = []
    for phase in [*fig["phases"], "total"]:
        cells = [f"**{phase}**" if phase == "total" else phase]
        meds = {}
        for c in names:
            runs = [
                sum(run.get(p, 0.0) for p in fig["phases"]) if phase == "total" else run[phase]
                for run in configs[c]
                if phase == "total" or phase in run
            ]
            meds[c] = median(runs) if runs else 0.0
            cells.append(f"{fmt(meds[c])} [{fmt(min(runs))}-{fmt(max(runs))}]" if runs else "-")
        cells += [_ratio(meds[c], meds[names[0]]) for c in names[1:]]
        rows.append(cells)
    return _table(header, rows)


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _baseline(fig: Figure) -> str:
    base = fig.get("baseline")
    return str(base) if base in fig["series"] else next(iter(fig["series"]))


def _pairs(fig: Figure) -> list[tuple[str, str]]:
    """(series, reference) pairs for the summary: ``pairs`` if the figure names them (an empty
    list: none), else every series against the baseline."""
    if "pairs" in fig:
        return [(a, b) for a, b in fig["pairs"] if a in fig["series"] and b in fig["series"]]
    base = _baseline(fig)
    return [(name, base) for name in fig["series"] if name != base]


def _middle(fig: Figure, name: str) -> tuple[float, str]:
    """(median in display units, unit label) of one series."""
    if fig["kind"] == "latency":
        return percentile(fig["series"][name], 0.5) * 1e6, "µs p50"
    return median(fig["series"][name]), str(fig.get("unit", ""))


def _headline(fig: Figure) -> list[str]:
    """Summary rows: figure, 'series ÷ reference', ratio, medians (or one row per series with
    its median when the figure has nothing to compare)."""
    if fig["kind"] in ("sweep", "phases"):
        return []
    pairs = _pairs(fig)
    if not pairs:
        rows = []
        for name in fig["series"]:
            value, unit = _middle(fig, name)
            rows.append(f"| {fig['title']} | {name} | | {fmt(value)} {unit} |")
        return rows
    rows = []
    for name, base in pairs:
        ma, unit = _middle(fig, name)
        mb, _ = _middle(fig, base)
        rows.append(
            f"| {fig['title']} | {name} ÷ {base} | {_ratio(ma, mb)} | "
            f"{fmt(ma)} vs {fmt(mb)} {unit} |"
        )
    return rows


def render(raw: dict[str, Any], *, plots: dict[str, str] | None = None) -> str:
    """The Markdown report. ``plots`` maps a figure id to its PNG file name (None: no plots,
    with the reason in ``raw``-independent ``plot_status``)."""
    machine = raw["machine"]
    opts = raw.get("options", {})
    out = ["# vsockrpc benchmark report", ""]
    out.append(
        f"`{' '.join(['vsockrpc bench', *opts.get('argv', [])])}` on {machine.get('date', '?')}; "
        f"every sample is in `raw.json`, and `vsockrpc bench report raw.json --out DIR` "
        "rebuilds this report from it."
    )
    out += ["", "## Machine", ""]
    rows = []
    for key, label in _MACHINE_ROWS:
        if key in machine:
            value = machine[key]
            text = " / ".join(str(v) for v in value) if isinstance(value, list) else str(value)
            rows.append([label, text])
    out += _table(["", ""], rows)
    for note in raw.get("notes", []):
        out += ["", f"> {note}"]
    failed = [part["name"] for part in _model.failed_parts(raw)]
    if failed:  # no figures of theirs in the summary: say so before it
        out += ["", f"> **Incomplete run:** {', '.join(failed)} failed; see the part's section."]
    out += ["", _plot_status(plots)]
    summary = [row for part in raw["parts"] for fig in part["figures"] for row in _headline(fig)]
    if summary:
        out += ["", "## Summary (medians; ratio = series ÷ baseline)", ""]
        out += ["| figure | ratio of | ratio | medians |", "| --- | --- | --- | --- |", *summary]
    for part in raw["parts"]:
        out += ["", f"## {part['name']}: {part.get('title', '')}", ""]
        if part.get("skipped"):
            out += [f"Skipped: {part['skipped']}"]
            continue
        if part.get("failed"):
            out += [f"**Failed:** {part['failed']}"]
            continue
        path = part.get("path", {})
        if path:
            out.append("Path: " + "; ".join(f"{k}: {v}" for k, v in path.items()) + ".")
        for note in part.get("notes", []):
            out += ["", f"- {note}"]
        for fig in part["figures"]:
            out += ["", f"### {fig['title']}", ""]
            if fig.get("note"):
                out += [str(fig["note"]), ""]
            if fig["kind"] == "sweep":
                out += _sweep_table(fig)
            elif fig["kind"] == "phases":
                out += _phases_table(fig)
            else:
                out += _series_table(fig)
            if plots and fig["id"] in plots:
                out += ["", f"![{fig['title']}]({plots[fig['id']]})"]
    return "\n".join(out) + "\n"


def _plot_status(plots: dict[str, str] | None) -> str:
    if plots is None:
        return (
            "Plots: not drawn (matplotlib is not importable here; `pip install "
            "'vsockrpc[bench]'` and rerun `vsockrpc bench report`)."
        )
    return f"Plots: {len(plots)} PNG files next to this report (matplotlib)."


def write_report(raw: dict[str, Any], out: Path, *, json_only: bool = False) -> list[Path]:
    """Write ``raw.json`` (unless it is the file being re-rendered), ``report.md`` and the plots
    into ``out``; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    raw_path = out / "raw.json"
    # Insertion order kept (the first series is the baseline); compact: every sample is here.
    text = json.dumps(raw, ensure_ascii=False, separators=(",", ":")) + "\n"
    raw = json.loads(text)  # render what the file holds, so the file rebuilds the same report
    if not raw_path.exists() or raw_path.read_text() != text:
        raw_path.write_text(text)
        written.append(raw_path)
    if json_only:
        return written
    from vsockrpc.bench import _plots

    plots = _plots.draw(raw, out)
    if plots is not None:
        written += [out / name for name in plots.values()]
    report = out / "report.md"
    report.write_text(render(raw, plots=plots))
    written.append(report)
    return written
