"""Fetching single Debian packages through the host's apt configuration, into the cache.

``apt-get download`` uses the mirrors, proxies and keys apt is configured with (no host is
hard-coded here) and verifies the package against the signed index. The cache key is the
package's SHA256 from that index, so the same package version is fetched once; the unpacked
tree (``dpkg-deb -x``) is published atomically under ``<cache>/debs/<sha256>/``.

A suite the host does not list (the guest kernel's backports) gets a :func:`private_index`: apt
itself, pointed by ``-o Dir::…`` options at a sources list and index directory in the cache, so
signatures are checked as for the host's own suites and the host's apt state is not touched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import ImageError
from vsockrpc.image import cache

__all__ = [
    "HOST_INDEX",
    "AptIndex",
    "DebPackage",
    "host_arch",
    "private_index",
    "resolve",
    "resolve_dependency",
    "unpack",
]


@dataclass(frozen=True, slots=True)
class DebPackage:
    name: str
    version: str
    architecture: str
    sha256: str


@dataclass(frozen=True, slots=True)
class AptIndex:
    """Which apt index a lookup asks: the host's (no options) or a private one."""

    options: tuple[str, ...] = ()  # ``-o Dir::…`` options for apt-get / apt-cache
    lists: Path = Path("/var/lib/apt/lists")


HOST_INDEX = AptIndex()


def _run(argv: list[str], *, what: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise ImageError(
            f"{argv[0]} not found: {what} needs Debian's apt/dpkg tools",
            hint="run on Debian/Ubuntu (scripts/setup installs the rest)",
        )
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except subprocess.TimeoutExpired as err:
        raise ImageError(f"{what}: {argv[0]} timed out") from err
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(
            f"{what} failed: {detail}", hint="is the apt index current? (apt-get update)"
        )
    return proc.stdout


@functools.cache
def host_arch() -> str:
    """The host's Debian architecture name (``amd64``, ``arm64``...)."""
    return _run(["dpkg", "--print-architecture"], what="detecting the architecture").strip()


def _apt_lists_state(lists: Path = HOST_INDEX.lists) -> str:
    """Changes whenever ``apt-get update`` changes the index (names, sizes, mtimes)."""
    entries = (
        sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in lists.glob("*Packages*"))
        if lists.is_dir()
        else []
    )
    return cache.digest(entries)


def _memo_path(kind: str, name: str, index: AptIndex) -> Path | None:
    # apt-cache takes ~1 s per call on hosts without apt's binary cache; a lookup is
    # remembered on disk until the apt index changes.
    try:
        root = cache.cache_root()
    except ImageError:
        return None
    key = [kind, name, _apt_lists_state(index.lists)]
    if index != HOST_INDEX:
        key.append(str(index.lists))
    return root / "apt" / f"{cache.digest(key)[:32]}.json"


def private_index(source_line: str, *, root: Path | None = None) -> AptIndex:
    """An apt index of ``source_line`` alone, kept in the cache (``<cache>/apt/index-<key>``).

    It is fetched (``apt-get update``) when missing or when the host's own index changed since
    (the user ran ``apt-get update``); a build stays offline-capable once it was fetched.
    """
    entry = cache.entry("apt", f"index-{cache.digest(source_line)[:16]}", root=root)
    base = entry.path
    index = AptIndex(
        (
            f"-oDir::Etc::SourceList={base / 'sources.list'}",
            f"-oDir::Etc::SourceParts={base / 'sources.list.d'}",
            f"-oDir::State::Lists={base / 'lists'}",
            "-oDir::Cache::pkgcache=",
            "-oDir::Cache::srcpkgcache=",
            "-oAcquire::Languages=none",
            # The cache may sit where apt's unprivileged download user cannot write.
            "-oAPT::Sandbox::User=root",
        ),
        base / "lists",
    )
    host_state = _apt_lists_state()
    stamp = base / "host-state"
    with entry.lock():
        fetched = any((base / "lists").glob("*Packages*"))
        if fetched and stamp.is_file() and stamp.read_text() == host_state:
            return index
        (base / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (base / "sources.list.d").mkdir(exist_ok=True)
        (base / "sources.list").write_text(source_line + "\n")
        try:
            _run(
                ["apt-get", *index.options, "-q", "update"],
                what=f"fetching the index of {source_line}",
            )
        except ImageError:
            if not fetched:
                raise
            return index  # offline: the index fetched before still serves
        stamp.write_text(host_state)
    return index


@functools.cache
def resolve(name: str, index: AptIndex = HOST_INDEX) -> DebPackage:
    """The candidate version of package ``name`` in apt's index (the host's by default)."""
    memo = _memo_path("show", name, index)
    if memo is not None and memo.is_file():
        try:
            return DebPackage(**json.loads(memo.read_text()))
        except (ValueError, TypeError):
            pass
    pkg = _resolve_uncached(name, index)
    if memo is not None:
        memo.parent.mkdir(exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(pkg)))
        os.replace(tmp, memo)
    return pkg


def _resolve_uncached(name: str, index: AptIndex) -> DebPackage:
    text = _run(
        ["apt-cache", *index.options, "show", "--no-all-versions", name],
        what=f"looking up package {name}",
    )
    records = _records(text)
    if records and "SHA256" not in records[0]:
        # The candidate is the host's installed copy, which no index of this source lists (a
        # newer one from another suite): take the best version the index can download.
        text = _run(["apt-cache", *index.options, "show", name], what=f"looking up {name}")
        records = [r for r in _records(text) if "SHA256" in r] or records
    fields = records[0] if records else {}
    try:
        return DebPackage(
            fields["Package"], fields["Version"], fields["Architecture"], fields["SHA256"]
        )
    except KeyError as err:
        raise ImageError(
            f"package {name} has no {err.args[0]} field in the apt index",
            hint="apt-get update",
        ) from err


def _records(text: str) -> list[dict[str, str]]:
    """The records of ``apt-cache show`` output (blank-line separated), first value per key."""
    records: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(": ")
            if sep and not line.startswith(" ") and key not in fields:
                fields[key] = value.strip()
        if fields:
            records.append(fields)
    return records


@functools.cache
def resolve_dependency(metapackage: str, prefix: str, index: AptIndex = HOST_INDEX) -> str:
    """The first ``Depends`` of ``metapackage`` whose name starts with ``prefix``.

    Debian's ``linux-image-cloud-amd64`` is a metapackage depending on the versioned kernel
    package (``linux-image-6.1.0-NN-cloud-amd64``); that one carries the files.
    """
    memo = _memo_path("depends", f"{metapackage} {prefix}", index)
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    dep = _dependency_uncached(metapackage, prefix, index)
    if memo is not None:
        memo.parent.mkdir(exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(dep)
        os.replace(tmp, memo)
    return dep


def _dependency_uncached(metapackage: str, prefix: str, index: AptIndex) -> str:
    text = _run(
        ["apt-cache", *index.options, "depends", "--no-recommends", "--no-suggests", metapackage],
        what=f"resolving {metapackage}",
    )
    for line in text.splitlines():
        kind, sep, dep = line.strip().partition(": ")
        if sep and kind.lstrip("|") == "Depends" and dep.startswith(prefix):
            return dep.strip()
    raise ImageError(f"{metapackage} does not depend on a {prefix}* package", hint="apt-get update")


def unpack(pkg: DebPackage, *, root: Path | None = None, index: AptIndex = HOST_INDEX) -> Path:
    """Download ``pkg`` (once) and return the directory it is unpacked in (``dpkg-deb -x``)."""
    entry = cache.entry("debs", f"{pkg.sha256[:32]}-{pkg.name}", root=root)
    if entry.exists:
        return entry.path / "root"
    with entry.lock():
        if entry.exists:
            return entry.path / "root"
        with tempfile.TemporaryDirectory(prefix="vsockrpc-deb-") as dl, entry.build() as tmp:
            # apt-get download writes into the current directory.
            _run(
                ["apt-get", *index.options, "download", f"{pkg.name}={pkg.version}"],
                what="apt-get download",
                cwd=Path(dl),
            )
            debs = list(Path(dl).glob("*.deb"))
            if len(debs) != 1:
                raise ImageError(f"apt-get download {pkg.name} produced {len(debs)} files")
            got = cache.file_digest(debs[0])
            if got != pkg.sha256:
                raise ImageError(
                    f"{debs[0].name}: SHA256 {got} does not match the apt index ({pkg.sha256})"
                )
            _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], what="dpkg-deb -x")
            (tmp / "package").write_text(f"{pkg.name} {pkg.version} {pkg.architecture}\n")
    return entry.path / "root"
