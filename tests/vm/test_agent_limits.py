"""1,000 idle connections to a real guest's agent port do not deny the agent to the host.

Each connection is a hybrid ``CONNECT 9999`` → ``OK`` through the userspace vsock device (never
an AF_VSOCK connect on this machine), then silence. The guest agent used to run with 1,024 open
files and a relay thread pair per connection: ~150 of these made `vsockrpc info` fail
("not ready after 10 s") and the console said ``File descriptor limit reached``.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import time

import pytest

from vsockrpc import transport
from vsockrpc.addresses import HybridAddress
from vsockrpc.errors import VsockRpcError
from vsockrpc.vm import Vm

IDLE = 1000


@pytest.mark.timeout(600)
def test_info_answers_while_1000_idle_connections_are_held(vm: Vm, vsockrpc_cli: list[str]) -> None:
    address = vm.address()
    assert isinstance(address, HybridAddress), f"expected the userspace device, got {address}"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > IDLE + 200, f"this test needs an open-files hard limit over {IDLE + 200}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the test's own sockets
    with contextlib.ExitStack() as held:
        held.callback(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        start = time.monotonic()
        refused: str | None = None
        opened = 0
        for _ in range(IDLE):
            try:
                held.enter_context(transport.connect(address, timeout=60))
            except VsockRpcError as err:  # count how far it got, then still try info
                refused = str(err)
                break
            opened += 1
        opened_seconds = time.monotonic() - start
        console_before = vm.console_text()
        start = time.monotonic()
        info = subprocess.run(
            [*vsockrpc_cli, "info", str(address), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        info_seconds = time.monotonic() - start
        print(
            f"{opened} connections opened in {opened_seconds:.1f} s; "
            f"info exited {info.returncode} after {info_seconds:.1f} s"
        )
        assert opened == IDLE, f"only {opened} of {IDLE} connections got OK: {refused}"
        assert info.returncode == 0, info.stderr
        assert '"kernel' in info.stdout
    console = vm.console_text()
    assert "File descriptor limit reached" not in console, console[len(console_before) - 2000 :]
    assert info_seconds < 60
