"""SDK ``Guest`` objects that are never closed, against a real guest: once collected they hold
no fd, thread or private directory."""

from __future__ import annotations

import gc
import glob
import os
import tempfile

import pytest

from tests.chaos.conftest import Runtime, Usage, assert_bystander_fine, settles_to
from vsockrpc.sdk import Guest
from vsockrpc.vm import Vm

pytestmark = pytest.mark.timeout(600)
CALLS = int(os.environ.get("VSOCKRPC_CHAOS_GUESTS", "100"))


def test_unclosed_guests_leak_nothing(
    runtime: Runtime, bystander: Vm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Private relay directories go to the temp dir: a fresh one of this test's own, so that
    # other processes' directories do not count.
    scratch = tempfile.mkdtemp(prefix="vg-", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", scratch)

    def _private_dirs() -> set[str]:
        return set(glob.glob(os.path.join(scratch, "vsockrpc-*")))

    address = bystander.address()
    with Guest(address, wait=60) as warm:  # grpc's process-wide threads start here
        assert warm.run(["true"], timeout=60).exit_code == 0
    before, dirs_before = Usage.now(), _private_dirs()
    for _ in range(CALLS):
        assert Guest(address, call_timeout=60).run(["true"], timeout=60).exit_code == 0
    gc.collect()
    after = settles_to(before)
    assert after.fds <= before.fds, f"{after.fds - before.fds} fds leaked by {CALLS} Guests"
    assert after.threads <= before.threads, f"threads: {before.threads} -> {after.threads}"
    assert after.os_threads <= before.os_threads, (before, after)
    assert _private_dirs() <= dirs_before, _private_dirs() - dirs_before
    monkeypatch.undo()
    os.rmdir(scratch)  # empty, or this fails: something was left in it
    assert_bystander_fine(runtime, bystander)
