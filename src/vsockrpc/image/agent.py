"""Installing vsockrpc itself (the agent) into the guest rootfs.

The package is copied from wherever this process imports it (a checkout or a wheel), minus
bytecode caches; its digest is part of the image key, so a changed agent rebuilds the image.
The guest starts it through ``/usr/local/bin/vsockrpc-init`` (``init=`` on the kernel command
line, like the original's ``init=/opt/server``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import vsockrpc
from vsockrpc.image import cache

__all__ = ["INIT_PATH", "INIT_SCRIPT", "agent_digest", "install_agent", "package_dir"]

INIT_PATH = "/usr/local/bin/vsockrpc-init"
# -u: the console gets every line at once; -I: ignore PYTHON* variables and the CWD.
INIT_SCRIPT = """#!/usr/bin/python3 -uI
import sys
from vsockrpc.guest.__main__ import main
sys.exit(main())
"""


def package_dir() -> Path:
    return Path(vsockrpc.__file__).resolve().parent


def agent_digest() -> str:
    return cache.digest({"package": cache.tree_digest(package_dir()), "init": INIT_SCRIPT})


def install_agent(root: Path, site_packages: Path) -> None:
    """Copy the vsockrpc package into ``site_packages`` and write the init script."""
    shutil.copytree(
        package_dir(),
        site_packages / "vsockrpc",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        dirs_exist_ok=False,
    )
    init = root / INIT_PATH.lstrip("/")
    init.parent.mkdir(parents=True, exist_ok=True)
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
