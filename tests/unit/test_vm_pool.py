"""The warm pool's bookkeeping, with restores faked: ready at once, replenished, a guest
handed out once only, everything it started stopped on close, failures surfaced."""

from __future__ import annotations

import importlib
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vsockrpc.errors import VmError
from vsockrpc.vm.options import InvalidVmOption
from vsockrpc.vm.pool import Pool
from vsockrpc.vm.restoring import Snapshot

restore_mod = importlib.import_module("vsockrpc.vm.restoring")


class FakeVm:
    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.stopped = 0
        self.alive = True

    def running(self) -> bool:
        return self.alive and not self.stopped

    def stop(self) -> int:
        self.stopped += 1
        return 0


class Restorer:
    def __init__(self) -> None:
        self.cids = itertools.count(3)
        self.made: list[FakeVm] = []
        self.fail: BaseException | None = None
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []

    def __call__(self, snapshot: Any, count: int, **kw: Any) -> list[FakeVm]:
        self.calls.append(kw)
        if self.fail is not None:
            raise self.fail
        with self.lock:
            vms = [FakeVm(next(self.cids)) for _ in range(count)]
            self.made += vms
        return vms


@pytest.fixture
def restorer(monkeypatch: pytest.MonkeyPatch) -> Restorer:
    fake = Restorer()
    monkeypatch.setattr(restore_mod, "restore_many", fake)
    return fake


SNAP = Snapshot(Path("/s"), {}, None)  # type: ignore[arg-type]


def test_acquire_hands_each_guest_out_once_and_replenishes(restorer: Restorer) -> None:
    with Pool(SNAP, size=2) as pool:
        got = [pool.acquire(timeout=10) for _ in range(5)]
        assert len({vm.cid for vm in got}) == 5
        pool.acquire(timeout=10)
    assert all(vm.stopped >= 1 for vm in restorer.made)  # waiting and handed out alike


def test_a_guest_that_died_while_waiting_is_never_handed_out(restorer: Restorer) -> None:
    with Pool(SNAP, size=1) as pool:
        first: Any = pool.acquire(timeout=10)
        first.alive = False
        deadline = time.monotonic() + 10
        while restorer.made[-1] is first:  # until the replacement is restored
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = restorer.made[-1]
        waiting.alive = False
        got: Any = pool.acquire(timeout=10)
        assert got is not waiting and got.running()
        assert waiting.stopped == 1


def test_restore_failures_surface_and_closed_pool_refuses(restorer: Restorer) -> None:
    restorer.fail = VmError("snapshot /s was taken with QEMU 7.1.0, this is 7.2.22")
    pool = Pool(SNAP, size=1)
    with pytest.raises(VmError, match="cannot restore guests: snapshot /s was taken with QEMU"):
        pool.acquire(timeout=10)
    pool.close()
    with pytest.raises(VmError, match="the pool is closed"):
        pool.acquire(timeout=1)


def test_size_is_validated() -> None:
    with pytest.raises(InvalidVmOption, match="pool size 0"):
        Pool(SNAP, size=0)


def test_every_guest_of_a_grouped_pool_joins_its_groups(restorer: Restorer) -> None:
    userspace = Snapshot(Path("/u"), {"guest": {"vsock": "vhost-user-vsock-pci"}}, None)  # type: ignore[arg-type]
    with Pool(userspace, size=2, groups=["lab", "ci", "lab"]) as pool:
        assert pool.groups == ("lab", "ci")
        for _ in range(3):
            pool.acquire(timeout=10)
    assert restorer.calls and all(kw["groups"] == ("lab", "ci") for kw in restorer.calls)


def test_bad_input_or_a_kernel_vsock_snapshot_with_groups_fails_before_any_restore(
    restorer: Restorer,
) -> None:
    threads = threading.active_count()
    with pytest.raises(InvalidVmOption, match=r"group name '\.\./lab' is invalid"):
        Pool(SNAP, size=1, groups=["../lab"])
    with pytest.raises(InvalidVmOption, match="timeout nan s is invalid"):
        Pool(SNAP, size=1, ready_timeout=float("nan"))
    kernel = Snapshot(Path("/k"), {"guest": {"vsock": "vhost-vsock-pci"}}, None)  # type: ignore[arg-type]
    with pytest.raises(VmError, match=r"snapshot /k uses kernel vhost-vsock.*cannot join a group"):
        Pool(kernel, size=1, groups=["lab"])
    assert restorer.calls == []
    assert threading.active_count() == threads  # no filler thread left behind
