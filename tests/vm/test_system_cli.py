"""The CLI on a real guest: detached ``vm run``, ``add --wait`` through the boot race,
``vm list``, ``vm stop`` leaving nothing behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.vm.conftest import process_alive
from vsockrpc.image import ImageInfo


def run(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def test_detached_vm_add_wait_list_stop(
    guest_image: ImageInfo, vsockrpc_cli: list[str], tmp_path: Path
) -> None:
    name = f"t{tmp_path.name[-8:]}".replace("_", "")
    started = run(
        [
            *vsockrpc_cli,
            "vm",
            "run",
            "--image",
            str(guest_image.path),
            "--detach",
            "--no-wait",
            "--name",
            name,
        ]
    )
    assert started.returncode == 0, started.stderr
    address = started.stdout.split("agent at ")[1].split(",")[0]
    listed = run([*vsockrpc_cli, "vm", "list"], timeout=30)
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith(name))
    assert "running" in line
    run_dir = Path(address.removeprefix("hvsock:").rsplit(":", 1)[0]).parent
    state = json.loads((run_dir / "state.json").read_text())
    try:
        # The guest is still booting: --wait must ride out the race, not fail at once.
        added = run(
            [
                *vsockrpc_cli,
                "add",
                "5",
                "7",
                "--target",
                address,
                "--wait",
                "180",
                "--timeout",
                "30",
            ]
        )
        assert added.returncode == 0, added.stderr
        assert added.stdout.strip() == "Addition result: 5 + 7 = 12"
    finally:
        stopped = run([*vsockrpc_cli, "vm", "stop", name], timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "powered off" in stopped.stdout
    assert not process_alive(state["qemu_pid"])
    assert not state["device_pid"] or not process_alive(state["device_pid"])
    assert not run_dir.exists()
