"""Load asyncio, the asyncio halves of grpcio and protobuf's pure-Python messages only if
something uses them.

``import grpc`` imports :mod:`asyncio` (grpcio's Cython core and ``grpc.aio``), and the health
and reflection packages import their asyncio servicers; the agent's server is a sync
``grpc.Server`` on threads and uses none of it. protobuf imports its pure-Python message
implementation whatever its backend. In a TCG guest that is a good part of the agent's start
(docs/system.md, "Boot time"): natively ``import grpc`` takes about half as long without
asyncio.

:func:`deferring` puts a stand-in module in ``sys.modules`` for each of :data:`DEFERRED` while
the agent imports grpcio and its services, and takes the stand-ins out again afterwards. What
imported a stand-in keeps it; its first attribute read imports the real module (once, under a
lock) and is answered from it, so code that does use asyncio later still works, only paying
the import then. After the window an ``import asyncio`` is an ordinary import.

Hand-rolled rather than :class:`importlib.util.LazyLoader`: the stand-in must stay out of
``sys.modules`` after the window (a lazy module left there would be loaded by the first
``import asyncio.x`` through its ``__path__`` and that submodule imported twice), and Python
3.11's lazy module is not thread-safe (a second thread can read the half-executed module).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

__all__ = ["DEFERRED", "Deferred", "deferring"]

#: Imported by grpcio, grpcio-health-checking and grpcio-reflection at their import; used by
#: none of them on a sync server. And protobuf's pure-Python message implementation (with
#: ``text_format`` and the well-known types it imports): protobuf imports it whatever the
#: backend, and uses it only when the backend is pure Python (the guest's is upb).
DEFERRED = (
    "asyncio",
    "grpc.aio",
    "grpc.experimental.aio",
    "grpc_health.v1._async",
    "google.protobuf.internal.python_message",
)

_lock = threading.RLock()


class Deferred(ModuleType):
    """Stands in for a module not imported yet; any attribute it lacks comes from the real
    module, imported on the first such read."""

    def __getattr__(self, attr: str) -> object:
        return getattr(_real(self.__name__), attr)


def _real(name: str) -> ModuleType:
    with _lock:
        module = sys.modules.get(name)
        if isinstance(module, Deferred):
            del sys.modules[name]  # still inside the window: import it for real
            module = None
        if module is None:
            module = importlib.import_module(name)
        return module


@contextlib.contextmanager
def deferring(names: tuple[str, ...] = DEFERRED) -> Iterator[None]:
    """Imports inside the block bind stand-ins for ``names`` that nothing has imported yet."""
    placed: dict[str, Deferred] = {}
    with _lock:
        for name in names:
            if name not in sys.modules:
                placed[name] = sys.modules[name] = Deferred(name)
    try:
        yield
    finally:
        with _lock:
            for name, stand_in in placed.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
