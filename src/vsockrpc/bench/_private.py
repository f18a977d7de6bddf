"""Every non-public name the benchmark parts use, in one place.

The parts measure internals on purpose (the relay with splice(2) off, the device driven by the
test driver as its guest, the device tests' minimal probe guest); when those move, this module is
the one to change.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from vsockrpc.rpc._relay import Relay
from vsockrpc.vhost.testing import GuestDriver, RxLayout

__all__ = ["GuestDriver", "Relay", "RxLayout", "device_guest_recipe"]


def device_guest_recipe() -> ModuleType | None:
    """``tests/vm/_device_guest.py`` (the probe guest: cloud kernel, busybox, a static C probe
    with a virtio-net NIC beside our device) when running from a source checkout; None in an
    installed package, which does not ship the tests. Loaded from its file, not imported: the
    tests are not part of the package."""
    path = Path(__file__).resolve().parents[3] / "tests" / "vm" / "_device_guest.py"
    if not path.is_file():
        return None
    name = "vsockrpc_bench_device_guest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
