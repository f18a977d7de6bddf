"""Test tiers follow the folder: tests/unit → ``unit``, tests/integration → ``integration``,
tests/vm → ``vm``, tests/chaos → ``chaos``. Select with ``-m``; CI runs all four."""

from __future__ import annotations

from pathlib import Path

import pytest

_TIERS = ("unit", "integration", "vm", "chaos")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
