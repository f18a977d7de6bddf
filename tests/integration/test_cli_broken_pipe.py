"""A reader that goes away (`vsockrpc ... | head`) ends the CLI quietly with 141 (128+SIGPIPE)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.agent_harness import AgentUnderTest

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "vsockrpc.cli.main"]


def run_into_closed_pipe(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Run the CLI with stdout a pipe nobody reads any more: the first write gets EPIPE."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [*CLI, *args],
            stdin=subprocess.DEVNULL,
            stdout=writer,
            stderr=subprocess.PIPE,
            env=env,
            timeout=45,
            check=False,
        )
    finally:
        os.close(writer)
    return done.returncode, done.stderr


def test_vm_list_into_a_closed_pipe_needs_no_guest(tmp_path: Path) -> None:
    env = {**os.environ, "VSOCKRPC_RUNTIME_DIR": str(tmp_path)}  # no VMs: prints "no VMs"
    assert run_into_closed_pipe("vm", "list", env=env) == (141, b"")


def test_exec_into_a_closed_pipe(agent: AgentUnderTest) -> None:
    assert run_into_closed_pipe("exec", "-n", agent.address, "--", "seq", "1", "100") == (141, b"")


def test_info_into_a_closed_pipe(agent: AgentUnderTest) -> None:
    assert run_into_closed_pipe("info", agent.address) == (141, b"")


def test_exec_piped_into_head(agent: AgentUnderTest) -> None:
    # 1.3 MB of output: far more than a pipe holds, so the CLI writes after head has exited.
    cli = shlex.join([*CLI, "exec", "-n", agent.address, "--", "seq", "1", "200000"])
    script = f"set -o pipefail; {cli} | head -c 10"
    done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=45, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (141, b"1\n2\n3\n4\n5\n", b"")
