"""Import sets measured in a fresh interpreter started like the guest starts it (``-S``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vsockrpc


def test_pid1_imports_stay_small() -> None:
    # PID 1's import set is boot time under TCG: no subprocess (ctypes.util), pathlib, argparse.
    code = (
        "import sys; import vsockrpc.guest.__main__, vsockrpc.guest.init; "
        "print(' '.join(m for m in ('subprocess', 'pathlib', 'argparse', 'ctypes.util', 'grpc')"
        " if m in sys.modules))"
    )
    src = str(Path(vsockrpc.__file__).parent.parent)  # -S like the guest: no site, no .pth
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": src},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


def test_markers_and_tickets_load_only_the_standard_library() -> None:
    # PID 1 imports the markers (boot time under TCG), the launcher imports them on the host.
    code = (
        "import sys; import vsockrpc.agent, vsockrpc.agent.markers, vsockrpc.agent.datachannel; "
        "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'google', 'ctypes') or m.startswith(('vsockrpc.guest', 'vsockrpc.services'))))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(Path(vsockrpc.__file__).parent.parent)},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []
