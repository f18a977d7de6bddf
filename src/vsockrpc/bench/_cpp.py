"""Build the C++ Addition server and client (``cpp/``) against the system's grpc++, cached;
and two single-file references that need only g++: the relay part's splice relay and the device
part's hand-offs.

Optional: needs g++, pkg-config, protoc and grpc_cpp_plugin and the grpc++ and protobuf
development files (Debian: ``g++ pkg-config libgrpc++-dev libprotobuf-dev
protobuf-compiler-grpc``). Without them the ``rpc`` part says which is missing and skips the
C++ line. Binaries are cached under the vsockrpc cache
(``bench-cpp/<digest of sources and toolchain versions>``), so a second run does not recompile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from vsockrpc.errors import VsockRpcError

HERE = Path(__file__).resolve().parent
SOURCES = ("addition_server.cc", "addition_client.cc")
RELAY_SOURCE = "splice_relay.cc"
HANDOFFS_SOURCE = "handoffs.cc"
PROTO = HERE.parent / "proto" / "vsock_service.proto"
TOOLS = ("g++", "pkg-config", "protoc", "grpc_cpp_plugin")
#: pkg-config modules the server links against, and the Debian package that ships each (Debian's
#: libgrpc++-dev does not pull libprotobuf-dev in without recommends).
PKG_CONFIG_MODULES = (("grpc++", "libgrpc++-dev"), ("protobuf", "libprotobuf-dev"))


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def missing() -> str | None:
    """Why the C++ line cannot be built here, or None when it can."""
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return (
            f"{', '.join(absent)} not found "
            "(Debian: g++ pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc)"
        )
    unfound = []
    for module, package in PKG_CONFIG_MODULES:
        try:
            _out(["pkg-config", "--exists", module])
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            unfound.append((module, package))
    if unfound:
        modules = "/".join(module for module, _ in unfound)
        packages = " ".join(package for _, package in unfound)
        return f"pkg-config finds no {modules} development files (Debian: {packages})"
    return None


def toolchain() -> str:
    """One line naming the compiler and grpc++ versions."""
    gxx = _out(["g++", "--version"]).splitlines()[0]
    grpcpp = _out(["pkg-config", "--modversion", "grpc++"]).strip()
    return f"{gxx}; grpc++ {grpcpp}"


def gxx_missing() -> str | None:
    """Why a single-file C++ reference (the splice relay, the hand-offs) cannot be built here,
    or None when it can."""
    return None if shutil.which("g++") else "g++ not found (Debian: g++)"


def optional_reference(
    build: Callable[[Callable[[str], None]], Path],
    line: str,
    progress: Callable[[str], None],
    notes: list[str],
) -> Path | None:
    """The executable of a one-file reference ``line`` (``build``: :func:`build_relay`,
    :func:`build_handoffs`), or None with a note saying why not: no g++, or the build failed.
    A reference line is not the part: the part measures without it."""
    why = gxx_missing()
    if why is None:
        try:
            return build(progress)
        except VsockRpcError as err:
            why = str(err)
    notes.append(f"no {line} line: {why}")
    return None


def build_relay(progress: Callable[[str], None]) -> Path:
    """The splice relay executable (``cpp/splice_relay.cc``), compiled now or from the cache."""
    return _build_single(RELAY_SOURCE, "bench-relay", "the C++ splice relay", progress)


def build_handoffs(progress: Callable[[str], None]) -> Path:
    """The hand-offs executable (``cpp/handoffs.cc``), compiled now or from the cache."""
    return _build_single(HANDOFFS_SOURCE, "bench-handoffs", "the C++ hand-offs", progress)


def _build_single(
    source_name: str, cache_dir: str, what: str, progress: Callable[[str], None]
) -> Path:
    """``cpp/<source_name>`` compiled with g++ alone, cached under ``<cache>/<cache_dir>``."""
    from vsockrpc.image.cache import cache_root, digest

    source = HERE / "cpp" / source_name
    gxx = _out(["g++", "--version"]).splitlines()[0]
    key = digest({"source": source.read_text(), "toolchain": gxx})
    final = cache_root() / cache_dir / key[:16]
    exe = final / source_name.removesuffix(".cc")
    if exe.exists():
        return exe
    final.parent.mkdir(parents=True, exist_ok=True)
    progress(f"compiling {what} (once, then cached)")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix="build-") as tmp:
        work = Path(tmp)
        (work / "bin").mkdir()
        out = work / "bin" / exe.name
        _compile(["g++", "-O2", "-std=c++17", "-pthread", str(source), "-o", str(out)])
        try:
            os.replace(work / "bin", final)
        except OSError:  # another run finished first: use its binary
            if not exe.exists():
                raise
    return exe


def build(progress: Callable[[str], None]) -> tuple[Path, Path]:
    """(server, client) executables, compiled now or taken from the cache."""
    from vsockrpc.image.cache import cache_root, digest

    cflags = _out(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"]).split()
    key = digest(
        {
            "sources": {n: (HERE / "cpp" / n).read_text() for n in SOURCES},
            "proto": PROTO.read_text(),
            "toolchain": toolchain(),
            "flags": cflags,
        }
    )
    final = cache_root() / "bench-cpp" / key[:16]
    server, client = final / "addition_server", final / "addition_client"
    if server.exists() and client.exists():
        return server, client
    final.parent.mkdir(parents=True, exist_ok=True)
    progress("compiling the C++ Addition server and client against grpc++ (once, then cached)")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix="build-") as tmp:
        work = Path(tmp)
        plugin = shutil.which("grpc_cpp_plugin")
        _compile(
            [
                "protoc",
                f"-I{PROTO.parent}",
                f"--cpp_out={work}",
                f"--grpc_out={work}",
                f"--plugin=protoc-gen-grpc={plugin}",
                str(PROTO),
            ]
        )
        objects = []
        for src in ("vsock_service.pb.cc", "vsock_service.grpc.pb.cc"):
            obj = work / (src + ".o")
            _compile(
                ["g++", "-O2", "-std=c++17", f"-I{work}", "-c", str(work / src), "-o", str(obj)]
            )
            objects.append(str(obj))
        for name in SOURCES:
            exe = work / name.removesuffix(".cc")
            src = str(HERE / "cpp" / name)
            _compile(
                ["g++", "-O2", "-std=c++17", f"-I{work}", src, *objects, "-o", str(exe), *cflags]
            )
        (work / "bin").mkdir()
        for exe in (server, client):
            os.replace(work / exe.name, work / "bin" / exe.name)
        try:
            os.replace(work / "bin", final)
        except OSError:  # another run finished first: use its binaries
            if not (server.exists() and client.exists()):
                raise
    return server, client


def _compile(argv: list[str]) -> None:
    try:
        subprocess.run(argv, capture_output=True, text=True, check=True, timeout=900)
    except subprocess.CalledProcessError as err:
        tail = " ".join((err.stderr or "").split())[-400:]
        raise VsockRpcError(f"building the C++ reference failed: {argv[0]}: {tail}") from err
    except subprocess.TimeoutExpired as err:
        raise VsockRpcError(f"building the C++ reference timed out: {argv[0]}") from err
