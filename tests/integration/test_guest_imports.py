"""PID 1's import set, measured in a fresh interpreter started like the guest starts it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_pid1_imports_stay_small() -> None:
    # PID 1's import set is boot time under TCG: no subprocess (ctypes.util), pathlib, argparse.
    code = (
        "import sys; import vsockrpc.guest.__main__, vsockrpc.guest.init; "
        "print(' '.join(m for m in ('subprocess', 'pathlib', 'argparse', 'ctypes.util', 'grpc')"
        " if m in sys.modules))"
    )
    import vsockrpc

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
