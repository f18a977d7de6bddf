"""The image lays the payload out: its sources under site-packages, an init running its entry."""

from __future__ import annotations

from pathlib import Path

from vsockrpc.image import agent
from vsockrpc.payload import Payload, SourceFile


def test_install_agent_writes_the_payload_and_an_init_for_its_entry(tmp_path: Path) -> None:
    src = tmp_path / "main.py"
    src.write_text("def main():\n    return 0\n")
    payload = Payload(pins={}, sources=(SourceFile("app/main.py", src),), entry_module="app.main")
    root = tmp_path / "root"
    site = root / "usr/local/lib/python3.11/dist-packages"
    agent.install_agent(payload, root, site)
    assert (site / "app/main.py").read_text() == src.read_text()
    init = root / agent.INIT_PATH.lstrip("/")
    assert init.stat().st_mode & 0o777 == 0o755
    text = init.read_text()
    assert "sys.path.append('/usr/local/lib/python3.11/dist-packages')" in text
    assert "from app.main import main" in text
    floor = root / agent.FLOOR_INIT_PATH.lstrip("/")
    assert floor.stat().st_mode & 0o777 == 0o755
    floor_text = floor.read_text()
    assert floor_text.startswith("#!/usr/bin/python3 -uIS\n")
    # loaded by path from site-packages: importing vsockrpc.guest.floor would run vsockrpc's init
    assert "'/usr/local/lib/python3.11/dist-packages' + \"/vsockrpc/guest/floor.py\"" in floor_text
    assert "import vsockrpc" not in floor_text and "from vsockrpc" not in floor_text
    # tailored kernels have no loader: this prints its hand-over line, then runs the init
    handover = root / agent.HANDOVER_PATH.lstrip("/")
    assert handover.stat().st_mode & 0o777 == 0o755
    assert handover.read_text().splitlines() == [
        "#!/bin/sh",
        f'echo "loader: switching to {agent.INIT_PATH}"',
        f'exec {agent.INIT_PATH} "$@"',
    ]
    first = agent.agent_digest(payload)
    src.write_text("def main():\n    return 1\n")
    assert agent.agent_digest(payload) != first
