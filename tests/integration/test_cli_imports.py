"""What a ``vsockrpc`` command loads before it runs: every command builds the whole parser, so
the parser must not pull in grpc, the SDK or the payload machinery; ``vm list`` needs none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("grpc", "google.protobuf", "vsockrpc.sdk", "vsockrpc.rpc", "vsockrpc.payload")

_LOADED = """
import json, sys
{setup}
heavy = {heavy!r}
print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))
"""


def _loaded(setup: str, env: dict[str, str] | None = None) -> list[str]:
    code = _LOADED.format(setup=setup, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    loaded: list[str] = json.loads(out.stdout.splitlines()[-1])
    return loaded


def test_building_the_parser_loads_no_grpc_sdk_or_payload() -> None:
    assert _loaded("from vsockrpc.cli.main import build_parser; build_parser()") == []


def test_vm_list_loads_no_grpc_or_sdk(tmp_path: Path) -> None:
    setup = (
        "from vsockrpc.cli.main import main\n"
        "assert main(['vm', 'list']) == 0\n"
        "assert main(['vm', 'list', '--json']) == 0"
    )
    env = {"PATH": "/usr/bin:/bin", "VSOCKRPC_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path)}
    assert _loaded(setup, env) == []


def test_a_command_that_calls_the_agent_still_loads_the_sdk() -> None:
    # the other side of the two tests above: the lazy imports still happen when needed
    setup = (
        "from vsockrpc.cli import agent\n"
        "import argparse\n"
        "try:\n"
        "    agent._guest(argparse.Namespace(address='unix:/nonexistent', wait=0))\n"
        "except Exception:\n"
        "    pass"
    )
    assert {"grpc", "vsockrpc.sdk"} <= set(_loaded(setup))
