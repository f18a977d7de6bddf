"""Every non-public name the benchmark parts use, in one place.

The parts measure internals on purpose (the relay with splice(2) off, the device driven by the
test driver as its guest, the device tests' minimal probe guest); when those move, this module is
the one to change.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from vsockrpc.rpc._relay import Relay
from vsockrpc.vhost.testing import GuestDriver, RxLayout

__all__ = ["GuestDriver", "Relay", "RxLayout", "device_guest_recipe"]


def device_guest_recipe() -> ModuleType | None:
    """``tests/vm/_device_guest.py`` (the probe guest: cloud kernel, busybox, a static C probe
    with a virtio-net NIC beside our device) when running from a source checkout; None in an
    installed package, which does not ship the tests."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "tests" / "vm" / "_device_guest.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.vm import _device_guest

    return _device_guest
