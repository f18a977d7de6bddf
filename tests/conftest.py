"""Test tiers follow the folder: tests/unit → ``unit``, tests/integration → ``integration``,
tests/vm → ``vm``, tests/chaos → ``chaos``. Select with ``-m``; CI runs all four.

The tier is the first part of the path relative to this directory, so a checkout that itself
lives under a folder named ``vm`` or ``unit`` marks nothing by accident.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "vm", "chaos")


def tier_of(path: Path) -> str | None:
    """The tier of a test file: its first folder under tests/, if that is a tier."""
    try:
        first = path.resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return first if first in TIERS else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item.path)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_configure(config: pytest.Config) -> None:
    """Signals ignored when the run began (``nohup``, ``cmd &`` in a script: SIGHUP, SIGINT,
    SIGQUIT) go back to their defaults. Ignored dispositions survive exec, so every process the
    tests start (the launcher, commands run by an in-process agent) would ignore the very
    signals the tests send them."""
    del config
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
