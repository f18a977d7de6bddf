"""A host command whose dependency is missing from a broken install says so in one line
(the name of the package and how to install it), exit 1, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

# The interpreter as a user would have it, with qemu.qmp unimportable (``None`` in
# sys.modules makes ``import qemu`` raise ModuleNotFoundError).
WITHOUT_QEMU = (
    "import sys; sys.modules['qemu'] = None; "
    "from vsockrpc.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize("command", [["vm", "run", "--image", "{tmp}/img"], ["demo"]])
def test_missing_qemu_qmp_is_one_line_not_a_traceback(command: list[str], tmp_path: Path) -> None:
    argv = [arg.format(tmp=tmp_path) for arg in command]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_QEMU, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    error, *rest = done.stderr.splitlines()
    assert error.startswith("vsockrpc: error: the Python package qemu.qmp ")
    assert rest == [
        f"hint: install it into this environment: {sys.executable} -m pip install qemu.qmp"
    ]
    assert list(tmp_path.iterdir()) == []
