"""The guest's grpcio/protobuf: PyPI manylinux wheels installed into the rootfs.

Debian's python3-grpcio is too old (1.51), so the pinned wheels of
``requirements/constraints.txt`` are downloaded for the guest's platform and Python
(``pip download --platform … --only-binary=:all:``) and unpacked with
``pip install --no-deps --target`` into ``/usr/local/lib/python3.X/dist-packages`` (on the
guest's ``sys.path``). Downloads are cached by (pins, platform, Python).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import vsockrpc
from vsockrpc.errors import ImageError
from vsockrpc.image import cache

__all__ = ["GUEST_DISTRIBUTIONS", "download", "install", "pinned_versions", "platform_tag"]

# What the guest imports: grpc (which needs typing_extensions), google.protobuf, grpc_health,
# grpc_reflection. Versions not pinned in constraints.txt follow the host's installed ones.
GUEST_DISTRIBUTIONS = (
    "grpcio",
    "protobuf",
    "grpcio-health-checking",
    "grpcio-reflection",
    "typing-extensions",
)
_PLATFORMS = {"amd64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}


def constraints_file() -> Path | None:
    """``requirements/constraints.txt`` of the checkout this package runs from, if any."""
    candidate = Path(vsockrpc.__file__).resolve().parents[2] / "requirements" / "constraints.txt"
    return candidate if candidate.is_file() else None


def pinned_versions(names: tuple[str, ...] = GUEST_DISTRIBUTIONS) -> dict[str, str]:
    """``name -> version`` from constraints.txt, else from what the host has installed."""
    pins: dict[str, str] = {}
    path = constraints_file()
    if path is not None:
        for raw in path.read_text().splitlines():
            name, sep, version = raw.split("#", 1)[0].strip().partition("==")
            if sep:
                pins[name.strip().lower()] = version.strip()
    out: dict[str, str] = {}
    for name in names:
        if name in pins:
            out[name] = pins[name]
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as err:
            raise ImageError(f"no pinned version for {name}") from err
    return out


def platform_tag(arch: str) -> str:
    try:
        return _PLATFORMS[arch]
    except KeyError as err:
        raise ImageError(f"no manylinux wheel platform known for architecture {arch}") from err


def _pip(args: list[str], what: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=900,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"{what} failed: {tail}")


def download(pins: dict[str, str], *, arch: str, python: str, root: Path | None = None) -> Path:
    """A cached directory holding the wheels for ``pins`` on ``arch``/CPython ``python``."""
    platform = platform_tag(arch)
    key = cache.digest({"pins": pins, "platform": platform, "python": python})
    entry = cache.entry("wheels", key, root=root)
    with entry.lock():
        if not entry.exists:
            with entry.build() as tmp:
                _pip(
                    [
                        "download",
                        "--no-deps",
                        "--only-binary=:all:",
                        f"--platform={platform}",
                        f"--python-version={python}",
                        "--implementation=cp",
                        f"--dest={tmp}",
                        *(f"{name}=={version}" for name, version in sorted(pins.items())),
                    ],
                    "pip download of the guest wheels",
                )
    return entry.path


def install(wheel_dir: Path, site_packages: Path) -> None:
    """Unpack every wheel in ``wheel_dir`` into ``site_packages`` (no dependency resolution)."""
    wheels = sorted(str(p) for p in wheel_dir.glob("*.whl"))
    if not wheels:
        raise ImageError(f"no wheels in {wheel_dir}")
    _pip(
        [
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--ignore-installed",
            f"--target={site_packages}",
            *wheels,
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
