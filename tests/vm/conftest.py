"""Fixtures for the vm tier: a real guest image and a real booted guest.

``guest_image`` (session): built once per run through the content-addressed cache, so a warm
cache makes it instant. ``vm`` (module): one booted guest per test module, yielded as
:class:`vsockrpc.vm.Vm` (``.cid``, ``.address(port)``, ``.hybrid_socket``, ``.console_text()``,
``.stop()``); after the module it is powered off and checked to have left no process behind.

These fixtures never skip: a vm-tier test must not pass without a real guest, so a missing
prerequisite (root, mmdebstrap, QEMU) is an error naming it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from vsockrpc.image import ImageInfo, build_image
from vsockrpc.vm import Vm, launch


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def guest_image() -> ImageInfo:
    return build_image()


@pytest.fixture(scope="module")
def vm(guest_image: ImageInfo) -> Iterator[Vm]:
    machine = launch(guest_image, ready_timeout=180)
    pids = [machine.qemu.pid] + ([machine.device.pid] if machine.device else [])
    try:
        yield machine
    finally:
        machine.stop()
        left = [pid for pid in pids if process_alive(pid)]
        assert not left, f"processes left behind by the VM: {left}"
        assert not machine.run_dir.exists(), f"run directory left behind: {machine.run_dir}"


@pytest.fixture
def vsockrpc_cli() -> list[str]:
    """argv prefix running this checkout's CLI in a subprocess."""
    return [sys.executable, "-m", "vsockrpc.cli.main"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Boots take tens of seconds under TCG; CI's per-test timeout must allow one.
    for item in items:
        if item.get_closest_marker("timeout") is None and "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.timeout(300))
