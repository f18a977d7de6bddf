"""An image spec (``vsockrpc.toml``): the user's packages, files and services for a guest.

:func:`load_spec` reads and validates the whole file before anything is built; every problem
is a :class:`~vsockrpc.errors.SpecError` (exit 2) naming the file, the line and the key. The
format is documented in ``docs/spec.md``. What the guest itself reads at boot is
:meth:`ImageSpec.guest_config` (written to :data:`GUEST_CONFIG_PATH` in the image): the
services to import, the commands to supervise, their environment and whether the agent's own
services run.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsockrpc.errors import SpecError
from vsockrpc.payload._pins import normalize
from vsockrpc.payload._sources import SourceFile
from vsockrpc.payload._spec_check import Source, Table

__all__ = [
    "BUNDLE_CONFIG",
    "GUEST_CONFIG_PATH",
    "KERNELS",
    "RESTART_POLICIES",
    "Command",
    "CopyItem",
    "ImageSpec",
    "PythonService",
    "load_spec",
]

# Where the image carries the guest's part of the spec (read by vsockrpc.guest at boot).
GUEST_CONFIG_PATH = "/etc/vsockrpc/guest.json"
# ... and where a bundle carries it: next to the vsockrpc package it extracts. Both names are
# repeated in vsockrpc.guest.userconfig (the guest never imports the host's builder);
# tests/unit/test_spec.py checks that they agree.
BUNDLE_CONFIG = "vsockrpc-guest.json"
RESTART_POLICIES = ("always", "on-failure", "never")
# The guest kernels an image can have (vsockrpc.image.tailored): Debian's, or one built for it.
KERNELS = ("debian", "tailored")

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_APT = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
_PIN = re.compile(r"^==\s*([A-Za-z0-9.+!*-]+)$")
_ENTRY = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_READY = re.compile(r"^(vsock|tcp):(\d+)$")

_TOP_KEYS = (
    "name, agent, memory, cpus, kernel, kernel_cmdline, apt, pip, pip_requirements, "
    "pip_find_links, "
    "env, copy, "
    "service, command"
)


@dataclass(frozen=True)
class CopyItem:
    """A file or directory tree from the host (``source``) placed at ``dest`` in the guest."""

    source: Path
    dest: str
    mode: int | None = None  # applied to the file, or to every file of a tree


@dataclass(frozen=True)
class PythonService:
    """A registrar ``module:function`` (called with the guest's ``grpc.Server``) and the
    package directory or module file that ships into the guest's site-packages."""

    register: str
    source: Path

    @property
    def module(self) -> str:
        return self.register.partition(":")[0]


@dataclass(frozen=True)
class Command:
    """A long-running program PID 1's supervisor starts, prefixes and restarts."""

    name: str
    argv: tuple[str, ...]
    restart: str = "on-failure"
    ready: str | None = None  # "vsock:PORT" or "tcp:PORT": accepting connections


@dataclass(frozen=True)
class ImageSpec:
    """A validated image spec; paths are absolute (resolved against the spec's directory)."""

    path: Path
    name: str | None = None
    agent: bool = True
    memory: int | None = None
    cpus: int | None = None
    kernel: str | None = None  # one of KERNELS; None: the builder's default (--kernel wins)
    kernel_cmdline: str = ""
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    pip_find_links: Path | None = None  # wheels only from here (and vsockrpc's own): offline
    env: Mapping[str, str] = field(default_factory=dict)
    copy: tuple[CopyItem, ...] = ()
    services: tuple[PythonService, ...] = ()
    commands: tuple[Command, ...] = ()

    def guest_config(self) -> dict[str, Any]:
        """What the guest reads at boot (JSON at :data:`GUEST_CONFIG_PATH`)."""
        return {
            "agent": self.agent,
            "env": dict(sorted(self.env.items())),
            "services": [s.register for s in self.services],
            "commands": [
                {"name": c.name, "argv": list(c.argv), "restart": c.restart, "ready": c.ready}
                for c in self.commands
            ],
        }

    def service_sources(self) -> tuple[SourceFile, ...]:
        """Every file of the services' packages (modules), relative to site-packages."""
        files: dict[str, Path] = {}
        for service in self.services:
            src = service.source
            if src.is_file():
                files[src.name] = src
                continue
            for path in sorted(src.rglob("*")):
                rel = path.relative_to(src.parent)
                if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
                    files[rel.as_posix()] = path
        return tuple(SourceFile(dest, files[dest]) for dest in sorted(files))

    def top_digest(self) -> str:
        """A digest of everything the top image layer takes from the spec: copied files
        (content, destination, mode), service sources, guest config, kernel command line."""
        h = hashlib.sha256()
        for item in self.copy:
            for rel, path in _tree(item.source):
                h.update(f"copy\0{item.dest}\0{rel}\0{item.mode}\0{_exec_bit(path)}\0".encode())
                h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
        for f in self.service_sources():
            h.update(f"service\0{f.dest}\0{f.digest()}\0".encode())
        h.update(repr(sorted(self.guest_config().items())).encode())
        h.update(f"cmdline\0{self.kernel_cmdline}".encode())
        return h.hexdigest()


def _tree(source: Path) -> list[tuple[str, Path]]:
    """``(relative path, file)`` for a file (``""``) or every regular file under a dir."""
    if source.is_file():
        return [("", source)]
    return [
        (p.relative_to(source).as_posix(), p)
        for p in sorted(source.rglob("*"))
        if p.is_file() and not p.is_symlink()
    ]


def _exec_bit(path: Path) -> int:
    return 1 if path.stat().st_mode & 0o111 else 0


def load_spec(path: Path | str) -> ImageSpec:
    """Read and validate the spec at ``path``; :class:`SpecError` (one line) on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"cannot read image spec {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise SpecError(f"image spec {path} is not UTF-8 text") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: invalid TOML: {err}") from err
    return _parse(Source(path, text), data, path.resolve().parent)


def _parse(source: Source, data: dict[str, Any], base: Path) -> ImageSpec:
    top = Table(source, (), data)
    name = top.string("name")
    if name is not None and not _NAME.match(name):
        raise top.error("name", f"{name!r} is not a valid image name (a-z 0-9 . _ -, ≤ 63)")
    agent = top.boolean("agent")
    spec = ImageSpec(
        path=source.path.resolve(),
        name=name,
        agent=True if agent is None else agent,
        memory=top.positive("memory"),
        cpus=top.positive("cpus"),
        kernel=_kernel(top),
        kernel_cmdline=_cmdline(top),
        apt=_apt(top),
        pip=_pip(top, base),
        pip_find_links=_find_links(top, base),
        env=_env(top),
        copy=tuple(_copy(t, base) for t in top.tables("copy")),
        services=_services(top, base),
        commands=_commands(top),
    )
    top.done(_TOP_KEYS)
    return spec


def _kernel(top: Table) -> str | None:
    value = top.string("kernel")
    if value is not None and value not in KERNELS:
        raise top.error("kernel", f"{value!r} is not a kernel (choose from {', '.join(KERNELS)})")
    return value


def _cmdline(top: Table) -> str:
    value = top.string("kernel_cmdline") or ""
    if "\n" in value or any(word.startswith("init=") for word in value.split()):
        raise top.error("kernel_cmdline", "must be one line and must not set init=")
    return " ".join(value.split())


def _apt(top: Table) -> tuple[str, ...]:
    names = top.strings("apt") or []
    for index, name in enumerate(names):
        if not _APT.match(name):
            raise top.error("apt", f"[{index}]: {name!r} is not a Debian package name")
    return tuple(sorted(set(names)))


def _pip(top: Table, base: Path) -> tuple[str, ...]:
    lines = [(req, ("pip",)) for req in top.strings("pip") or []]
    req_file = top.string("pip_requirements")
    if req_file is not None:
        file = base / req_file
        try:
            content = file.read_text()
        except OSError as err:
            raise top.error(
                "pip_requirements", f"cannot read {req_file}: {err.strerror or err}"
            ) from err
        for raw in content.splitlines():
            req = raw.split("#", 1)[0].strip()
            if req:
                lines.append((req, ("pip_requirements",)))
    pins: dict[str, str] = {}
    out: list[str] = []
    for req, where in lines:
        match = _REQUIREMENT.match(req)
        if match is None or req.startswith("-"):
            raise top.error(str(where[0]), f"{req!r} is not a requirement (name, name==version)")
        key = normalize(match.group(1))
        pin = _PIN.match(match.group(3).strip())
        if pin is not None:
            if key in pins and pins[key] != pin.group(1):
                raise top.error(
                    str(where[0]), f"conflicting pins for {key}: =={pins[key]} and =={pin.group(1)}"
                )
            pins[key] = pin.group(1)
        if req not in out:
            out.append(req)
    return tuple(out)


def _find_links(top: Table, base: Path) -> Path | None:
    value = top.string("pip_find_links")
    if value is None:
        return None
    path = base / value
    if not path.is_dir():
        raise top.error("pip_find_links", f"no such directory: {value}")
    return path.resolve()


def _env(top: Table) -> dict[str, str]:
    table = top.table("env")
    if table is None:
        return {}
    env: dict[str, str] = {}
    for key in table.data:
        if not _ENV.match(key):
            raise table.error(key, "not a valid environment variable name")
        value = table.string(key)
        assert value is not None
        env[key] = value
    return env


def _mode(table: Table) -> int | None:
    raw = table.raw("mode")
    if raw is None:
        return None
    if isinstance(raw, str) and re.fullmatch(r"0?[0-7]{3,4}", raw):
        return int(raw, 8)
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= 0o7777:
        return raw
    raise table.error("mode", f'expected an octal mode such as "0644" or 0o644, got {raw!r}')


def _copy(table: Table, base: Path) -> CopyItem:
    src = table.string("source", required=True)
    dest = table.string("dest", required=True)
    assert src is not None and dest is not None
    mode = _mode(table)
    table.done("source, dest, mode")
    path = base / src
    if not path.exists():
        raise table.error("source", f"no such file or directory: {src}")
    if not (path.is_file() or path.is_dir()):
        raise table.error("source", f"{src} is neither a regular file nor a directory")
    if not dest.startswith("/") or ".." in Path(dest).parts or dest.rstrip("/") == "":
        raise table.error("dest", f"{dest!r} must be an absolute guest path without '..'")
    return CopyItem(path.resolve(), dest.rstrip("/"), mode)


def _services(top: Table, base: Path) -> tuple[PythonService, ...]:
    out: list[PythonService] = []
    for table in top.tables("service"):
        register = table.string("register", required=True)
        src = table.string("source", required=True)
        assert register is not None and src is not None
        table.done("register, source")
        match = _ENTRY.match(register)
        if match is None:
            raise table.error(
                "register", f"{register!r} is not of the form package.module:function"
            )
        path = base / src
        if not (path.is_dir() or (path.is_file() and path.suffix == ".py")):
            raise table.error("source", f"no such package directory or .py module: {src}")
        top_name = path.name.removesuffix(".py") if path.is_file() else path.name
        if match.group(1).split(".")[0] != top_name:
            raise table.error(
                "register",
                f"module {match.group(1)} is not inside {src} (whose import name is {top_name})",
            )
        if top_name in ("vsockrpc", "grpc", "google"):
            raise table.error("source", f"{top_name} would shadow a package the guest runs on")
        out.append(PythonService(register, path.resolve()))
    return tuple(out)


def _commands(top: Table) -> tuple[Command, ...]:
    out: list[Command] = []
    for table in top.tables("command"):
        name = table.string("name", required=True)
        argv = table.strings("argv", required=True)
        restart = table.string("restart") or "on-failure"
        ready = table.string("ready")
        table.done("name, argv, restart, ready")
        assert name is not None and argv is not None
        if not _NAME.match(name):
            raise table.error("name", f"{name!r} is not a valid command name (a-z 0-9 . _ -)")
        if name in {c.name for c in out}:
            raise table.error("name", f"a command named {name!r} is already declared")
        if not argv or not argv[0].startswith("/"):
            raise table.error("argv", "must start with the program's absolute guest path")
        if restart not in RESTART_POLICIES:
            raise table.error(
                "restart", f"{restart!r}: expected one of {', '.join(RESTART_POLICIES)}"
            )
        if ready is not None:
            m = _READY.match(ready)
            if m is None or not 0 < int(m.group(2)) < 2**32:
                raise table.error("ready", f'{ready!r}: expected "vsock:PORT" or "tcp:PORT"')
        out.append(Command(name, tuple(argv), restart, ready))
    return tuple(out)


def require_spec_name(spec: ImageSpec, name: str | None) -> str:
    """The image name: ``name`` (e.g. ``--name``) over the spec's, validated."""
    chosen = name if name is not None else spec.name
    if chosen is None:
        raise SpecError(
            f"{spec.path}: the image has no name",
            hint='add name = "..." to the spec or pass --name',
        )
    if not _NAME.match(chosen):
        raise SpecError(f"{chosen!r} is not a valid image name (a-z 0-9 . _ -, ≤ 63)")
    return chosen
