"""The guest's wheels: resolved by pip (the ordinary client) for the guest's CPython and
machine, kept in one content-addressed cache.

A *wheel set* is what one ``pip download --only-binary=:all: --platform … --python-version …``
of a list of requirements yields. Its key is a digest of every input that shapes it
(requirements, platforms, Python, whether dependencies are followed), and it is published as
``<cache>/wheels/<key>/`` with a directory rename, so a reader never sees half a set and a
failed download leaves nothing behind. Wheel file names are immutable on PyPI, and every
file's sha256 goes into the image and bundle manifests.

The cache root is ``$VSOCKRPC_CACHE``, else ``$XDG_CACHE_HOME/vsockrpc``, else
``~/.cache/vsockrpc`` (the image cache uses the same root).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import PayloadError

__all__ = ["Target", "WheelSet", "default_cache_root", "resolve_wheels", "run_pip"]

PIP_TIMEOUT = 900.0
# manylinux2014 is glibc 2.17 (PEP 599); both spellings of the tag are in use on PyPI.
_PLATFORMS = ("manylinux2014_{machine}", "manylinux_2_17_{machine}")
_MACHINES = ("x86_64", "aarch64")


@dataclass(frozen=True, slots=True)
class Target:
    """The interpreter wheels are resolved for: CPython ``python`` (``"3.11"``) on
    ``machine`` (``uname -m``: ``x86_64`` or ``aarch64``), glibc ≥ 2.17."""

    python: str
    machine: str = "x86_64"

    def __post_init__(self) -> None:
        match = re.fullmatch(r"3\.(\d+)", self.python)
        if match is None or int(match.group(1)) < 11:
            raise PayloadError(
                f"unsupported Python version {self.python!r}: expected 3.11 or later"
            )
        if self.machine not in _MACHINES:
            raise PayloadError(
                f"no manylinux wheels for machine {self.machine!r}: "
                f"expected one of {', '.join(_MACHINES)}"
            )

    @property
    def platforms(self) -> tuple[str, ...]:
        return tuple(p.format(machine=self.machine) for p in _PLATFORMS)


@dataclass(frozen=True, slots=True)
class WheelSet:
    """The wheels resolved for one :class:`Target`, sorted by file name."""

    target: Target
    wheels: tuple[Path, ...]

    def hashes(self) -> dict[str, str]:
        """``file name -> sha256`` (what the manifests record)."""
        return {w.name: _file_sha256(w) for w in self.wheels}


def default_cache_root() -> Path:
    """The cache root every built artefact of vsockrpc lives under (not created here)."""
    if os.environ.get("VSOCKRPC_CACHE"):
        return Path(os.environ["VSOCKRPC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vsockrpc"


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run_pip(args: Sequence[str], what: str, *, isolated: bool = False) -> None:
    """Run this interpreter's pip; :class:`PayloadError` with pip's last line when it fails.

    ``isolated`` ignores the user's pip configuration (for offline runs that must see only
    the directories given on the command line).
    """
    argv = [sys.executable, "-m", "pip", *(["--isolated"] if isolated else []), *args]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, check=False, timeout=PIP_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PayloadError(f"{what} failed: {err}") from err
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        missing = [ln for ln in lines if "No matching distribution found for" in ln]
        if missing:
            raise _MissingWheel(what, missing[0].rsplit(" ", 1)[-1])
        # A resolver conflict: pip's own line names the packages ("Cannot install a==1 and
        # b==2 because these package versions have conflicting dependencies.").
        conflict = [ln for ln in lines if "conflicting dependencies" in ln]
        detail = conflict[0].removeprefix("ERROR: ") if conflict else lines[-1]
        raise PayloadError(f"{what} failed: {detail}")


class _MissingWheel(PayloadError):
    """pip found no distribution for ``requirement`` (reworded by the caller)."""

    def __init__(self, what: str, requirement: str) -> None:
        super().__init__(f"{what} failed: no matching distribution for {requirement}")
        self.requirement = requirement


def _download(
    requirements: Sequence[str],
    target: Target,
    dest: Path,
    find_links: Path | None,
    deps: bool,
    *,
    also_from: Sequence[Path] = (),
) -> None:
    args = ["download", "--quiet", "--only-binary=:all:", f"--dest={dest}"]
    args += [] if deps else ["--no-deps"]
    args += [f"--python-version={target.python}", "--implementation=cp"]
    args += [f"--platform={p}" for p in target.platforms]
    if find_links is not None:
        args += ["--no-index", f"--find-links={find_links}"]
    args += [f"--find-links={d}" for d in also_from]
    where = f" in {find_links}" if find_links is not None else ""
    try:
        run_pip(
            [*args, *requirements],
            f"pip download of the guest wheels for Python {target.python}{where}",
            isolated=find_links is not None,
        )
    except _MissingWheel as err:
        raise PayloadError(
            f"no manylinux {target.machine} wheel of {err.requirement} "
            f"for Python {target.python}{where}",
            hint=f"put that wheel in {find_links}, or let pip download it (no wheel directory)"
            if find_links is not None
            else None,
        ) from err


def _listing(directory: Path, target: Target) -> WheelSet:
    return WheelSet(target, tuple(sorted(directory.glob("*.whl"), key=lambda p: p.name)))


def resolve_wheels(
    requirements: Sequence[str],
    target: Target,
    *,
    cache_root: Path | None = None,
    find_links: Path | None = None,
    offline: bool = False,
    deps: bool = False,
    also_from: Sequence[Path] = (),
) -> WheelSet:
    """The wheels of ``requirements`` for ``target``: exactly those (``name==version`` pins),
    or with ``deps`` what pip resolves for them, dependencies included (user requirements).

    From the cache (``<cache_root>/wheels/<key>``), else downloaded into it by pip; with
    ``find_links`` the wheels come only from that directory (nothing is downloaded or cached,
    the set refers to its files); with ``offline`` a set missing from the cache is an error.
    ``also_from``: more wheel directories pip looks in first (e.g. the guest's own cached
    wheels, so a user's requirements resolve against them without downloading them again).
    """
    if find_links is not None:
        with tempfile.TemporaryDirectory(prefix="vsockrpc-wheels-") as tmp:
            _download(requirements, target, Path(tmp), find_links, deps, also_from=also_from)
            names = sorted(p.name for p in Path(tmp).glob("*.whl"))
        dirs = [find_links, *also_from]
        return WheelSet(
            target,
            tuple(next((d / n for d in dirs if (d / n).is_file()), find_links / n) for n in names),
        )
    inputs = {
        "requirements": sorted(requirements),
        "platforms": list(target.platforms),
        "python": target.python,
        "implementation": "cp",
        "deps": deps,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    kind_dir = (cache_root if cache_root is not None else default_cache_root()) / "wheels"
    final = kind_dir / key
    if final.is_dir():
        return _listing(final, target)
    if offline:
        raise PayloadError(
            f"no cached guest wheels for Python {target.python} ({target.machine}) in {kind_dir}",
            hint="drop --offline to let pip download them",
        )
    try:
        kind_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=kind_dir))
    except OSError as err:
        raise PayloadError(
            f"wheel cache {kind_dir} is not writable: {err.strerror or err}",
            hint="set VSOCKRPC_CACHE to a writable directory",
        ) from err
    try:
        _download(requirements, target, staging, None, deps, also_from=also_from)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, final)
        except OSError:  # a concurrent build published the same key first: use that one
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _listing(final, target)
