"""PNG plots of a raw result document, when matplotlib is importable (``vsockrpc[bench]``).

One plot per figure, by kind: latency → CDF; rate/time → bars with min-max whiskers;
sweep → throughput against message size (log-log, median line, min-max band);
phases → one stacked bar per configuration (median of each phase).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from vsockrpc.bench._model import Figure, median

# matplotlib is the optional extra ``vsockrpc[bench]``, imported inside the functions that
# draw and only when present: a plain install (no matplotlib) runs the whole suite and its
# report says that no plots were drawn.
_WIDTH, _HEIGHT, _DPI = 6.4, 3.6, 90  # small PNGs (committed under docs/bench/)
_TITLE_CHARS = 60  # longer titles wrap: centred over the axes, 9-point lines hold ~65 characters


def available() -> bool:
    try:
        import matplotlib  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return True


def draw(raw: dict[str, Any], out: Path) -> dict[str, str] | None:
    """Draw every figure into ``out``; return {figure id: file name}, or None without
    matplotlib."""
    if not available():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vsockrpc.bench.report import plot_file

    files: dict[str, str] = {}
    for part in raw["parts"]:
        for fig in part["figures"]:
            figure, ax = plt.subplots(figsize=(_WIDTH, _HEIGHT), dpi=_DPI)
            try:
                _DRAW[fig["kind"]](ax, fig)
                title = f"{part['name']}: {fig['title']}"
                ax.set_title(textwrap.fill(title, _TITLE_CHARS), fontsize=9)
                ax.grid(True, alpha=0.3)
                figure.tight_layout()
                name = plot_file(fig)
                # No timestamp or software version in the file: same data, same PNG.
                figure.savefig(out / name, metadata={"Software": None})
                files[fig["id"]] = name
            finally:
                plt.close(figure)
    return files


def _cdf(ax: Any, fig: Figure) -> None:
    for name, samples in fig["series"].items():
        xs = sorted(v * 1e6 for v in samples)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("round trip (µs, log scale)")
    ax.set_ylabel("fraction of calls ≤ x")
    ax.legend(fontsize=8)


def _bars(ax: Any, fig: Figure) -> None:
    names = list(fig["series"])
    meds = [median(fig["series"][n]) for n in names]
    lows = [m - min(fig["series"][n]) for n, m in zip(names, meds, strict=True)]
    highs = [max(fig["series"][n]) - m for n, m in zip(names, meds, strict=True)]
    ax.barh(names, meds, xerr=[lows, highs], capsize=3, color="tab:blue", alpha=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{fig.get('unit', '')} (median, whiskers min-max)")


def _sweep(ax: Any, fig: Figure) -> None:
    from matplotlib import ticker

    xs = fig["x"]
    for name, per_x in fig["series"].items():
        meds = [median(v) for v in per_x]
        ax.plot(xs, meds, marker="o", markersize=3, label=name)
        ax.fill_between(xs, [min(v) for v in per_x], [max(v) for v in per_x], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [_size_label(int(x)) for x in xs], fontsize=7)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xlabel("message size (log scale)")
    ax.set_ylabel(fig.get("unit", ""))
    ax.legend(fontsize=8)


def _size_label(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _phases(ax: Any, fig: Figure) -> None:
    configs = list(fig["series"])
    left = [0.0] * len(configs)
    for phase in fig["phases"]:
        widths = [
            median([run[phase] for run in fig["series"][c] if phase in run] or [0.0])
            for c in configs
        ]
        ax.barh(configs, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median of each phase)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))


_DRAW = {"latency": _cdf, "rate": _bars, "time": _bars, "sweep": _sweep, "phases": _phases}
