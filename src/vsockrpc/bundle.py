"""``vsockrpc bundle``: one file that runs the guest agent on any x86_64 Linux with Python ≥ 3.11.

The bundle is the second output format of :mod:`vsockrpc.payload` (the guest image is the
first): the same sources and the same pinned wheels, as a zipapp (a ``#!/usr/bin/env python3``
line followed by a zip archive):

* ``__main__.py`` — a standard-library-only bootstrap (:mod:`vsockrpc._bundle_main`);
* ``payload/vsockrpc/…`` — the payload's sources (the guest-side parts of this package);
* ``wheels/*.whl`` — the payload's wheel set for each ``--python`` (manylinux x86_64 grpcio
  per CPython version, abi3 protobuf, the pure-Python rest);
* ``BUNDLE.json`` — manifest: vsockrpc version, content digest, entry module, wheels.

At start the bootstrap picks the wheels matching the running interpreter, extracts them and
the payload once into a cache directory keyed by the content digest (atomic rename, so
concurrent starts are safe), puts it first on ``sys.path`` and runs the payload's entry module
(``vsockrpc.guest``): the PID-1 init when it is PID 1 (``init=/path/to/bundle``), else the
agent server (``--listen ADDRESS``, default ``vsock:-1:9999``). Entries are written sorted with
fixed timestamps, so the same inputs give a byte-identical bundle.

Wheels come from the payload's wheel cache (pip downloads what is missing) or, offline, only
from ``wheel_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vsockrpc import __version__
from vsockrpc.errors import BundleError

if TYPE_CHECKING:  # the payload machinery loads when a bundle is built, not with the CLI
    from vsockrpc.payload import ImageSpec, Payload

__all__ = ["DEFAULT_PYTHONS", "MACHINE", "BundleInfo", "build_bundle"]

DEFAULT_PYTHONS = ("3.11", "3.12", "3.13", "3.14")
MACHINE = "x86_64"
SHEBANG = b"#!/usr/bin/env python3\n"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_BOOTSTRAP = Path(__file__).resolve().parent / "_bundle_main.py"


@dataclass(frozen=True, slots=True)
class BundleInfo:
    path: Path
    size: int
    digest: str
    pythons: tuple[str, ...]
    wheels: tuple[str, ...]


def _wheels(
    payload: Payload, pythons: Sequence[str], wheel_dir: Path | None, offline: bool
) -> list[Path]:
    """The union of the payload's wheel sets for ``pythons`` (pure wheels appear once)."""
    from vsockrpc.payload import Target

    targets = [Target(python, MACHINE) for python in pythons]  # validates every version first
    chosen: dict[str, Path] = {}
    for target in targets:
        wheel_set = payload.wheels(target, find_links=wheel_dir, offline=offline)
        for wheel in wheel_set.wheels:
            chosen.setdefault(wheel.name, wheel)
    return [chosen[name] for name in sorted(chosen)]


def _spec_wheels(spec: ImageSpec, payload: Payload, pythons: Sequence[str]) -> list[Path]:
    """The spec's ``pip`` wheels (with dependencies) for every Python of the bundle."""
    from vsockrpc.payload import Target, user_wheels

    out: list[Path] = []
    for python in pythons:
        out += user_wheels(spec, payload, Target(python, MACHINE)).wheels
    return out


def _write(output: Path, entries: list[tuple[str, bytes]]) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".part")
    except OSError as err:
        raise BundleError(f"cannot write {output}: {err.strerror or err}") from err
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
    except OSError as err:  # disk full, output is a directory...: one line, no partial file
        Path(tmp).unlink(missing_ok=True)
        raise BundleError(f"cannot write {output}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_bundle(
    output: Path,
    *,
    pythons: Sequence[str] = DEFAULT_PYTHONS,
    wheel_dir: Path | None = None,
    offline: bool = False,
    payload: Payload | None = None,
    spec: ImageSpec | None = None,
) -> BundleInfo:
    """Write the single-file agent to ``output`` (mode 0755); see the module docstring.

    ``payload`` defaults to :func:`vsockrpc.payload.guest_payload`; ``wheel_dir`` takes the
    wheels from that directory only, ``offline`` from the wheel cache only. ``spec``: an
    image spec's services (their sources, its ``pip`` wheels for every Python, its guest
    config next to the sources) ride along, so the bundle serves what the image serves.
    """
    from vsockrpc.payload import guest_payload
    from vsockrpc.payload.spec import BUNDLE_CONFIG

    payload = payload if payload is not None else guest_payload()
    wheels = _wheels(payload, pythons, wheel_dir, offline)
    entries = [(f"payload/{f.dest}", f.read()) for f in payload.sources]
    if spec is not None:
        wheels = sorted(
            {w.name: w for w in [*wheels, *_spec_wheels(spec, payload, pythons)]}.values(),
            key=lambda w: w.name,
        )
        entries += [(f"payload/{f.dest}", f.read()) for f in spec.service_sources()]
        config = json.dumps(spec.guest_config(), indent=1, sort_keys=True).encode()
        entries.append((f"payload/{BUNDLE_CONFIG}", config))
    entries += [(f"wheels/{w.name}", w.read_bytes()) for w in wheels]
    digest = hashlib.sha256()
    for name, data in entries:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    wheel_names = [w.name for w in wheels]
    manifest = {
        "format": 1,
        "vsockrpc": __version__,
        "digest": digest.hexdigest(),
        "entry": payload.entry_module,
        "pythons": list(pythons),
        "wheels": wheel_names,
    }
    entries = [
        ("__main__.py", _BOOTSTRAP.read_bytes()),
        ("BUNDLE.json", json.dumps(manifest, indent=1, sort_keys=True).encode()),
        *entries,
    ]
    output = output.resolve()
    _write(output, entries)
    return BundleInfo(
        path=output,
        size=output.stat().st_size,
        digest=digest.hexdigest(),
        pythons=tuple(pythons),
        wheels=tuple(wheel_names),
    )
