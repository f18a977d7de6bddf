"""A warm pool of restored guests: a ready guest at once, replenished in the background.

    with vsockrpc.vm.Pool("snap/", size=2) as pool:
        with pool.acquire() as vm:              # restored, agent answering, never used before
            Guest(vm.address()).run(["make"])
        # leaving the inner block stops that guest; the pool has restored another meanwhile

One background thread keeps ``size`` guests restored and waiting (restoring the missing ones
at once with :func:`~.restoring.restore_many`). A guest is handed out once and never comes back:
the caller stops it (``with``, or ``stop()``). ``close()`` stops what is waiting, what is being
restored, and what was handed out and still runs: a foreground QEMU dies with the thread that
started it (PDEATHSIG), so guests from a pool live at most as long as the pool.

The snapshot is verified (sha256) once, when the pool is made. ``groups``: every guest of the
pool joins these groups (see ``docs/groups.md``), so guests acquired from it reach each other
and the group's other members by CID.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vsockrpc.errors import VmError
from vsockrpc.vm import restoring
from vsockrpc.vm.options import InvalidVmOption, check_groups, check_ready_timeout
from vsockrpc.vm.restoring import (
    READY_TIMEOUT,
    RestoredVm,
    Snapshot,
    check_clone_groups,
    load_snapshot,
)

__all__ = ["Pool"]

RETRY_PAUSE = 1.0  # s between failed restores
MAX_SIZE = 64


class Pool:
    def __init__(
        self,
        snapshot: Snapshot | Path | str,
        size: int = 2,
        *,
        ready_timeout: float = READY_TIMEOUT,
        fresh_identity: bool = True,
        groups: Sequence[str] = (),
    ) -> None:
        if not 1 <= size <= MAX_SIZE:
            raise InvalidVmOption(f"pool size {size}: expected 1 to {MAX_SIZE}")
        # Bad input fails here, not in every background restore (seen only by acquire()).
        self.groups = check_groups(groups)
        check_ready_timeout(ready_timeout)
        self._snapshot = (
            snapshot if isinstance(snapshot, Snapshot) else load_snapshot(snapshot, verify=True)
        )
        check_clone_groups(self._snapshot, self.groups)
        self.size = size
        self._ready_timeout = ready_timeout
        self._fresh = fresh_identity
        self._ready: collections.deque[RestoredVm] = collections.deque()
        self._out: list[RestoredVm] = []
        self._cond = threading.Condition()
        self._closed = False
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self.restored = 0  # guests restored so far (for tests and stats)
        self._thread = threading.Thread(target=self._fill, name="vsockrpc-pool", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._ready) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
                missing = self.size - len(self._ready)
            try:
                vms = restoring.restore_many(
                    self._snapshot,
                    missing,
                    ready_timeout=self._ready_timeout,
                    cancel=self._cancel,
                    fresh_identity=self._fresh,
                    groups=self.groups,
                )
            except BaseException as err:  # reported by acquire(); KeyboardInterrupt = closing
                with self._cond:
                    if self._closed:
                        return
                    self._error = err
                    self._cond.notify_all()
                self._cancel.wait(RETRY_PAUSE)
                continue
            with self._cond:
                self.restored += len(vms)
                self._error = None
                if not self._closed:
                    self._ready.extend(vms)
                    self._cond.notify_all()
                    continue
            for vm in vms:  # closed while they were restored
                vm.stop()
            return

    def acquire(self, timeout: float | None = None) -> RestoredVm:
        """A ready guest nobody used before (waits for one when the pool is empty).

        :class:`VmError` when the pool is closed, when restoring keeps failing (the last
        error), or after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise VmError("the pool is closed")
                while self._ready:
                    vm = self._ready.popleft()
                    self._cond.notify_all()  # room for a replacement
                    if vm.running():
                        self._out.append(vm)
                        return vm
                    vm.stop()  # died while waiting: never hand it out
                if self._error is not None:
                    raise VmError(f"the pool cannot restore guests: {self._error}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise VmError(f"no guest ready in the pool after {timeout:g} s")
                self._cond.wait(left)

    def close(self) -> None:
        """Stop every guest the pool restored, waiting, in progress or handed out."""
        with self._cond:
            self._closed = True
            self._cancel.set()
            self._cond.notify_all()
            left = list(self._ready) + self._out
            self._ready.clear()
            self._out = []
        self._thread.join()
        for vm in left:
            with contextlib.suppress(VmError, OSError):
                vm.stop()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
