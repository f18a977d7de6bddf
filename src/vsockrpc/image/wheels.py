"""The guest's wheels installed into the rootfs (the image's half of :mod:`vsockrpc.payload`).

Debian's python3-grpcio is too old (1.51), so the payload's wheel set for the guest's machine
and CPython is unpacked with ``pip install --no-deps --no-index --target`` into
``/usr/local/lib/python3.X/dist-packages`` (on the guest's ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

from vsockrpc.errors import ImageError
from vsockrpc.payload import Target, WheelSet, run_pip

__all__ = ["install", "target"]

# Debian architecture → ``uname -m`` (the manylinux platform tags use the latter).
_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


def target(arch: str, python: str) -> Target:
    """The wheel target of a guest of Debian architecture ``arch`` running CPython ``python``."""
    try:
        return Target(python, _MACHINES[arch])
    except KeyError as err:
        raise ImageError(f"no manylinux wheel platform known for architecture {arch}") from err


def install(wheel_set: WheelSet, site_packages: Path) -> None:
    """Unpack every wheel of ``wheel_set`` into ``site_packages`` (no dependency resolution)."""
    if not wheel_set.wheels:
        raise ImageError(f"no guest wheels resolved for Python {wheel_set.target.python}")
    run_pip(
        [
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--ignore-installed",
            f"--target={site_packages}",
            *(str(w) for w in wheel_set.wheels),
        ],
        "pip install of the guest wheels",
    )
    _drop_install_provenance(site_packages)


def _drop_install_provenance(site_packages: Path) -> None:
    """Remove ``direct_url.json`` (PEP 610: it records the wheel's path on the build host,
    i.e. the cache directory) and its RECORD line, so equal inputs give equal files."""
    for dist_info in site_packages.glob("*.dist-info"):
        (dist_info / "direct_url.json").unlink(missing_ok=True)
        record = dist_info / "RECORD"
        if record.is_file():
            lines = record.read_text().splitlines(keepends=True)
            record.write_text("".join(ln for ln in lines if "/direct_url.json," not in ln))
