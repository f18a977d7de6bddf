"""Run the parts in order and collect one raw result document."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from vsockrpc.bench import _machine, _model
from vsockrpc.bench._context import Context
from vsockrpc.errors import VsockRpcError

log = logging.getLogger(__name__)

PARTS = ("relay", "rpc", "device", "forward", "vmvm", "agent", "boot")
# No guest: device runs its backend-alone half, forward has the device alone as its guest.
QUICK_PARTS = ("relay", "rpc", "device", "forward")


def _module(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"vsockrpc.bench.{name}")


def _round(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    return value


def _rounded(result: dict[str, Any]) -> dict[str, Any]:
    """Samples rounded to what the clocks resolve: latencies (seconds) to 1 ns, other figures
    to 4 decimals; keeps raw.json small without changing a reported digit."""
    for fig in result["figures"]:
        fig["series"] = _round(fig["series"], 9 if fig["kind"] == "latency" else 4)
    return result


def run_suite(
    parts: Sequence[str],
    *,
    quick: bool,
    progress: Callable[[str], None],
    argv: Sequence[str] = (),
) -> dict[str, Any]:
    """Run ``parts`` (all of :data:`PARTS`, or :data:`QUICK_PARTS` with ``quick``, when empty)
    and return the raw document.

    A part that fails (a guest that crashed while booting, a server that did not start) is
    recorded with its error (:func:`~._model.failed`) and the next part runs: one failure does
    not throw away the other parts' minutes of measurement. An interruption (Ctrl-C, SIGTERM)
    still ends the run."""
    chosen = list(parts) or list(QUICK_PARTS if quick else PARTS)
    progress(f"vsockrpc bench: {', '.join(chosen)}{' (quick)' if quick else ''}")
    machine = _machine.describe()
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="vsockrpc-bench-"))
    try:
        for name in chosen:
            sub = workdir / name
            sub.mkdir(mode=0o700)
            ctx = Context(quick=quick, progress=progress, workdir=sub)
            start = time.monotonic()
            module = _module(name)
            try:
                result = _rounded(module.run(ctx))
            except Exception as err:  # recorded in the report; the CLI exits 1 naming it
                log.debug("bench part %s failed", name, exc_info=True)  # -vv: the traceback
                reason = (
                    str(err) if isinstance(err, VsockRpcError) else f"{type(err).__name__}: {err}"
                )
                reason = " ".join(reason.split()) or type(err).__name__
                result = _model.failed(name, str(getattr(module, "TITLE", name)), reason)
                progress(f"[{name}] failed: {reason}")
            result["seconds"] = round(time.monotonic() - start, 1)
            if not result.get("failed"):
                progress(f"[{name}] done in {result['seconds']:.1f} s")
            results.append(result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine["load_after"] = _machine.load_average()
    notes = []
    loads = machine["load_before"][:1] + machine["load_after"][:1]
    if loads and max(loads) > machine["cores"]:
        notes.append(
            f"Busy machine: 1-minute load average {' → '.join(f'{v:.1f}' for v in loads)} on "
            f"{machine['cores']} cores (other work was running); ratios from interleaved runs "
            "are more trustworthy than absolute figures."
        )
    return {
        "schema": _model.SCHEMA,
        "machine": machine,
        "options": {"parts": chosen, "quick": quick, "argv": list(argv)},
        "notes": notes,
        "parts": results,
    }
