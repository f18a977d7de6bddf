"""Installing vsockrpc's guest side (the agent) into the guest rootfs.

What ships is the payload's decision (:mod:`vsockrpc.payload`: the parts in
``GUEST_PARTS``); this module lays those files into the rootfs's site-packages and writes the
init script. Host-only layers stay out, so editing them does not rebuild the image; the digest
of what is copied is part of the image key. The guest starts it through
``/usr/local/bin/vsockrpc-init`` (``init=`` on the kernel command line, like the original's
``init=/opt/server``).
"""

from __future__ import annotations

from pathlib import Path

from vsockrpc.image import cache
from vsockrpc.image.initramfs import HANDOVER
from vsockrpc.payload import Payload

__all__ = [
    "FLOOR_INIT_PATH",
    "HANDOVER_PATH",
    "INIT_PATH",
    "agent_digest",
    "init_script",
    "install_agent",
]

INIT_PATH = "/usr/local/bin/vsockrpc-init"
# -u: the console gets every line at once; -I: ignore PYTHON* variables and the CWD; -S: no
# `site` (its import and .pth scan are slow under TCG), so the one directory it would
# add — where the agent and the wheels live — is put on sys.path here ({site}, from the base).
_INIT_SCRIPT = """#!/usr/bin/python3 -uIS
import sys
sys.path.append({site!r})
from {entry} import main
sys.exit(main())
"""

# The boot bench's floor (vsockrpc.guest.floor): a bare grpcio server as PID 1, loaded by path
# so that nothing of vsockrpc is imported. Booted only with this init= on the command line.
FLOOR_INIT_PATH = "/usr/local/bin/vsockrpc-floor-init"
_FLOOR_SCRIPT = """#!/usr/bin/python3 -uIS
import sys
sys.path.append({site!r})
from importlib.util import module_from_spec, spec_from_file_location
spec = spec_from_file_location("vsockrpc_floor", {site!r} + "/vsockrpc/guest/floor.py")
floor = module_from_spec(spec)
spec.loader.exec_module(floor)
floor.main()
"""


# init= of images whose kernel mounts the root itself (image/tailored.py: no loader). It prints
# the loader's hand-over line, which ends the launcher's firmware+kernel phase, so that the
# phases of a boot mean the same for every kernel; dash starts in a few milliseconds.
HANDOVER_PATH = "/usr/local/bin/vsockrpc-handover"
_HANDOVER_SCRIPT = f"""#!/bin/sh
echo "{HANDOVER}{INIT_PATH}"
exec {INIT_PATH} "$@"
"""


def init_script(payload: Payload, site: str) -> str:
    """The init script running ``payload``'s entry module from ``site`` (a guest path)."""
    return _INIT_SCRIPT.format(site=site, entry=payload.entry_module)


def agent_digest(payload: Payload) -> str:
    """Content key of what :func:`install_agent` writes (sources and init script template)."""
    return cache.digest(
        {
            "sources": payload.source_digest(),
            "init": _INIT_SCRIPT,
            "floor": _FLOOR_SCRIPT,
            "handover": _HANDOVER_SCRIPT,
        }
    )


def install_agent(payload: Payload, root: Path, site_packages: Path) -> None:
    """Lay ``payload``'s sources into ``site_packages`` and write the init script."""
    payload.write_sources(site_packages)
    init = root / INIT_PATH.lstrip("/")
    init.parent.mkdir(parents=True, exist_ok=True)
    site = "/" + site_packages.relative_to(root).as_posix()
    init.write_text(init_script(payload, site))
    init.chmod(0o755)
    floor = root / FLOOR_INIT_PATH.lstrip("/")
    floor.write_text(_FLOOR_SCRIPT.format(site=site))
    floor.chmod(0o755)
    handover = root / HANDOVER_PATH.lstrip("/")
    handover.write_text(_HANDOVER_SCRIPT)
    handover.chmod(0o755)
