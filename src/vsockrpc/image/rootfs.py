"""The guest's Debian root filesystem, made by mmdebstrap.

Variant ``essential`` (the Essential:yes set, no apt) plus ``python3``; documentation, man
pages and locales are never unpacked (dpkg ``path-exclude``). With ``SOURCE_DATE_EPOCH`` set,
mmdebstrap makes the package set and its metadata reproducible; :func:`clamp_mtimes` pins the
file times afterwards, because a directory output keeps the unpack times.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from vsockrpc.errors import ImageError

__all__ = ["PACKAGES", "build_rootfs", "clamp_mtimes", "guest_python", "prune", "require_root"]

PACKAGES = ("python3", "libstdc++6")  # libstdc++: the grpcio manylinux wheel links it
_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)
# What the agent never uses (≈60 MB): stdlib parts, full perl, iconv modules, apt leftovers.
_PRUNE = (
    "usr/lib/python3.*/test",
    "usr/lib/python3.*/idlelib",
    "usr/lib/python3.*/ensurepip",
    "usr/lib/python3.*/lib2to3",
    "usr/lib/python3.*/pydoc_data",
    "usr/lib/python3.*/turtledemo",
    "usr/lib/python3.*/tkinter",
    # Full perl comes in through usrmerge (bookworm's merged-/usr transition); the guest never
    # runs dpkg or perl scripts (perl-base stays). glibc's iconv modules: Python does not use them.
    "usr/share/perl",
    "usr/lib/*-linux-gnu/perl",
    "usr/lib/*-linux-gnu/gconv",
    "var/cache/apt/archives/*.deb",
    "var/lib/apt/lists/*",
    "var/log/*",
)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(
            f"{what} needs root (mmdebstrap creates device nodes and root-owned files)",
            hint="run as root, e.g. sudo .venv/bin/vsockrpc image build",
        )
    if shutil.which("mmdebstrap") is None:
        raise ImageError(
            "mmdebstrap not found", hint="apt-get install mmdebstrap (scripts/setup does it)"
        )


def build_rootfs(
    dest: Path,
    *,
    release: str,
    mirrors: Sequence[str],
    packages: Sequence[str] = PACKAGES,
    epoch: int,
    log: Path,
) -> None:
    """Create the root filesystem in the empty or absent directory ``dest``."""
    require_root("building the guest rootfs")
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=essential",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in _EXCLUDES),
        release,
        str(dest),
        *mirrors,
    ]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    with log.open("wb") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ImageError(f"mmdebstrap failed ({proc.returncode}): {tail[0]}", hint=f"see {log}")


def prune(root: Path) -> None:
    for pattern in _PRUNE:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def guest_python(root: Path) -> str:
    """The guest's Python ``major.minor`` (e.g. ``"3.11"``), from its stdlib directory."""
    found = sorted(
        p.name.removeprefix("python")
        for p in (root / "usr" / "lib").glob("python3.*")
        if (p / "os.py").is_file()
    )
    if len(found) != 1:
        raise ImageError(f"expected one Python 3 in the rootfs, found {found or 'none'}")
    return found[0]


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Set every file's (and symlink's) mtime/atime to ``epoch``, deepest first."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))
