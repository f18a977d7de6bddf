"""``vsockrpc bundle``: one file that runs the guest agent on any x86_64 Linux with Python ≥ 3.11.

The bundle is a zipapp (a ``#!/usr/bin/env python3`` line followed by a zip archive):

* ``__main__.py`` — a standard-library-only bootstrap (:mod:`vsockrpc._bundle_main`);
* ``payload/vsockrpc/…`` — this package's Python sources;
* ``wheels/*.whl`` — manylinux x86_64 wheels of grpcio (one per CPython version), protobuf
  (abi3) and the pure-Python grpcio-health-checking, grpcio-reflection and typing-extensions,
  pinned to the versions installed here;
* ``BUNDLE.json`` — manifest: vsockrpc version, content digest, wheels.

At start the bootstrap picks the wheels matching the running interpreter, extracts them and
the payload once into a cache directory keyed by the content digest (atomic rename, so
concurrent starts are safe), puts it first on ``sys.path`` and runs ``vsockrpc.guest``: the
PID-1 init when it is PID 1 (``init=/path/to/bundle``), else the agent server
(``--listen ADDRESS``, default ``vsock:-1:9999``). Entries are written sorted with fixed
timestamps, so the same inputs give a byte-identical bundle.

Wheels come from pip (``pip download``, the ordinary client, into a cache directory) or from
``wheel_dir`` for offline builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import vsockrpc
from vsockrpc import __version__
from vsockrpc.errors import BundleError

__all__ = [
    "DEFAULT_PYTHONS",
    "PLATFORMS",
    "BundleInfo",
    "build_bundle",
    "default_wheel_cache",
    "fetch_wheels",
    "runtime_requirements",
]

DEFAULT_PYTHONS = ("3.11", "3.12", "3.13", "3.14")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64")
_PURE = ("grpcio-health-checking", "grpcio-reflection", "typing-extensions")
SHEBANG = b"#!/usr/bin/env python3\n"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_PACKAGE = Path(vsockrpc.__file__).resolve().parent
_BOOTSTRAP = _PACKAGE / "_bundle_main.py"


@dataclass(frozen=True, slots=True)
class BundleInfo:
    path: Path
    size: int
    digest: str
    pythons: tuple[str, ...]
    wheels: tuple[str, ...]


def runtime_requirements() -> list[str]:
    """The agent's runtime distributions pinned to the versions installed here."""
    names = (
        "grpcio",
        "protobuf",
        "grpcio-health-checking",
        "grpcio-reflection",
        "typing-extensions",  # grpcio >= 1.7x imports it (grpc.aio)
    )
    try:
        return [f"{name}=={metadata.version(name)}" for name in names]
    except metadata.PackageNotFoundError as err:
        raise BundleError(f"{err.name} is not installed: cannot pin the bundle's wheels") from err


def default_wheel_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vsockrpc" / "wheels"


def _py_tag(python: str) -> str:
    if not re.fullmatch(r"3\.\d+", python) or int(python.split(".")[1]) < 11:
        raise BundleError(f"unsupported Python version {python!r}: expected 3.11 or later")
    return "cp3" + python.split(".")[1]


def _wheel_tags(name: str) -> tuple[str, str, str, str]:
    """(distribution, python tag, abi tag, platform tag) of a wheel file name."""
    parts = name[: -len(".whl")].split("-")
    return parts[0].lower().replace("_", "-"), parts[-3], parts[-2], parts[-1]


def _select(directory: Path, requirement: str, python: str | None) -> Path | None:
    """The wheel in ``directory`` for ``requirement`` (name==version) and CPython ``python``."""
    name, version = requirement.split("==")
    tag = _py_tag(python) if python else None
    for path in sorted(directory.glob("*.whl")):
        dist, py, abi, platform = _wheel_tags(path.name)
        if dist != name.lower() or path.name.split("-")[1] != version:
            continue
        if platform == "any" and abi == "none":
            return path
        if not any(p in platform for p in ("x86_64",)):
            continue
        if tag is not None and (abi == tag or (abi == "abi3" and py <= tag)):
            return path
    return None


def fetch_wheels(
    requirements: Sequence[str],
    pythons: Sequence[str],
    cache: Path,
    *,
    offline: bool = False,
) -> list[Path]:
    """Wheels for every requirement and Python, from ``cache`` or downloaded into it by pip."""
    cache.mkdir(parents=True, exist_ok=True)
    needed: list[tuple[str, str | None]] = []
    for req in requirements:
        pure = req.split("==")[0] in _PURE
        needed.extend([(req, None)] if pure else [(req, py) for py in pythons])
    chosen: list[Path] = []
    for req, py in needed:
        found = _select(cache, req, py)
        if found is None and not offline:
            _pip_download(req, py, cache)
            found = _select(cache, req, py)
        if found is None:
            for_py = f" for Python {py}" if py else ""
            raise BundleError(
                f"no manylinux x86_64 wheel of {req}{for_py} in {cache}",
                hint="drop --offline to let pip download it, or put the wheel there",
            )
        if found not in chosen:
            chosen.append(found)
    return chosen


def _pip_download(requirement: str, python: str | None, cache: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(cache),
    ]
    if python is not None:
        argv += ["--python-version", python, "--implementation", "cp"]
        for platform in PLATFORMS:
            argv += ["--platform", platform]
    argv.append(requirement)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BundleError(f"pip download {requirement} failed: {err}") from err
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise BundleError(f"pip download {requirement} (Python {python or 'any'}) failed: {last}")


def _payload_files() -> list[tuple[str, Path]]:
    files = []
    for path in sorted(_PACKAGE.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        if path.suffix not in (".py", ".typed", ".proto"):
            continue
        files.append((f"payload/vsockrpc/{path.relative_to(_PACKAGE).as_posix()}", path))
    return files


def _entries(wheels: Iterable[Path]) -> list[tuple[str, bytes]]:
    entries = [(name, path.read_bytes()) for name, path in _payload_files()]
    entries += [(f"wheels/{w.name}", w.read_bytes()) for w in sorted(wheels)]
    return entries


def build_bundle(
    output: Path,
    *,
    pythons: Sequence[str] = DEFAULT_PYTHONS,
    wheel_dir: Path | None = None,
    offline: bool = False,
) -> BundleInfo:
    """Write the single-file agent to ``output`` (mode 0755); see the module docstring."""
    for python in pythons:
        _py_tag(python)
    wheels = fetch_wheels(
        runtime_requirements(),
        pythons,
        wheel_dir if wheel_dir is not None else default_wheel_cache(),
        offline=offline or wheel_dir is not None,
    )
    entries = _entries(wheels)
    digest = hashlib.sha256()
    for name, data in entries:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    wheel_names = [w.name for w in sorted(wheels)]
    manifest = {
        "format": 1,
        "vsockrpc": __version__,
        "digest": digest.hexdigest(),
        "pythons": list(pythons),
        "wheels": wheel_names,
    }
    entries = [
        ("__main__.py", _BOOTSTRAP.read_bytes()),
        ("BUNDLE.json", json.dumps(manifest, indent=1, sort_keys=True).encode()),
        *entries,
    ]
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, data in entries:
                    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
                    info.external_attr = 0o644 << 16
                    # Wheels are already compressed: store them, deflate the sources.
                    info.compress_type = (
                        zipfile.ZIP_STORED if name.endswith(".whl") else zipfile.ZIP_DEFLATED
                    )
                    zf.writestr(info, data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return BundleInfo(
        path=output,
        size=output.stat().st_size,
        digest=digest.hexdigest(),
        pythons=tuple(pythons),
        wheels=tuple(wheel_names),
    )
