"""``vsockrpc vm snapshot``: save a running guest whose agent is ready to a directory.

QEMU refuses to migrate ``vhost-user-vsock-pci`` (the device's state lives in our device
process, not in QEMU), so with the userspace device the guest first releases its vsock
device: ``device_del`` on its hot-pluggable root port (:data:`~.qemu.VSOCK_PORT`), wait for
``DEVICE_DELETED``. Then ``stop`` + ``migrate`` to ``state.bin`` and, unless ``--stop``,
``cont`` and ``device_add`` of the same device again (the device process kept its
vhost-user connection: the chardev stays). Kernel vhost-vsock migrates as is (QEMU sends
``VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`` on load), so it is not unplugged.

A snapshot directory is complete only once ``manifest.json`` exists (written last, by
rename): it names the image (path and digest of its manifest), QEMU version, machine type,
the guest's boot configuration (read from the running QEMU's command line, what is actually
running) and the sha256 of every file. Any failure while saving (disk full) removes the
directory this call created, and the guest is resumed with its device back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from vsockrpc import rpc
from vsockrpc.addresses import HybridAddress
from vsockrpc.agent import markers
from vsockrpc.errors import TransportError, VmError
from vsockrpc.vm.guestexec import guest_python
from vsockrpc.vm.qemu import VSOCK_DEVICE, VSOCK_PORT, vhost_user_vsock_device
from vsockrpc.vm.qmpsession import Session, run_session
from vsockrpc.vm.ramfile import ZSTD_SUFFIX, compress, find_guest_ram, save_sparse
from vsockrpc.vm.registry import VmRecord, list_vms, stop_vm

__all__ = [
    "FORMAT",
    "IGNORE_SHARED",
    "MANIFEST",
    "RAM_FILE",
    "RAM_FILES",
    "STATE_FILE",
    "SnapshotInfo",
    "device_add_args",
    "file_sha256",
    "snapshot_vm",
]

FORMAT = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.bin"
RAM_FILE = "ram.bin"  # guest RAM, sparse (:mod:`.ramfile`); not in state.bin then
RAM_FILES = (RAM_FILE, RAM_FILE + ZSTD_SUFFIX)  # as is, or compressed
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
log = logging.getLogger(__name__)

MIGRATE_TIMEOUT = 300.0
READY_PROBE = 5.0  # s the agent gets to answer before a snapshot
SHRINK_TIMEOUT = 60.0

# Run in the guest (python3 -IS -c) before it is saved; prints how many bytes it zeroed.
# QEMU's migration sends a page that reads all zero as a flag, not 4 KiB: a guest's free pages
# are not zero (freed page cache, old heap), so they would be saved in full. Drop the clean
# page cache (Documentation/admin-guide/sysctl/vm.rst, drop_caches), then have the kernel
# hand nearly all free memory to one anonymous mapping: every page it faults in is cleared
# (MADV_POPULATE_WRITE = 23, Linux 5.14, include/uapi/asm-generic/mman-common.h); unmapped,
# they are free again and zero. A reserve of four times the kernel's min_free_kbytes (at least
# 8 MiB) stays untouched: free memory never drops under the high watermark, so nothing is
# reclaimed and the guest's own allocations go on meanwhile.
SHRINK_SCRIPT = """
import mmap, os
os.sync()
with open("/proc/sys/vm/drop_caches", "w") as f:
    f.write("3")
info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/meminfo")}
with open("/proc/sys/vm/min_free_kbytes") as f:
    reserve = max(4 * 1024 * int(f.read()), 8 << 20)
size = info["MemFree"] - reserve
size -= size % mmap.PAGESIZE
if size > 0:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(23)
    m.close()
print(max(size, 0))
"""


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    path: Path
    manifest: dict[str, Any]
    seconds: float  # guest paused (stop → cont, or → quit)

    @property
    def disk_bytes(self) -> int:
        """Bytes the snapshot takes on disk: its RAM file is sparse (the guest's zeroed free
        pages take no blocks), so this is far below the files' apparent size."""
        return sum(f.stat().st_blocks * 512 for f in self.path.iterdir() if f.is_file())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _find(which: str) -> VmRecord:
    for record in list_vms():
        if which in (record.name, str(record.cid)):
            return record
    raise VmError(
        f"no VM named or with CID {which!r} started by vsockrpc", hint="see: vsockrpc vm list"
    )


def _qemu_argv(record: VmRecord) -> list[str]:
    try:
        raw = Path(f"/proc/{record.qemu_pid}/cmdline").read_bytes()
    except OSError as err:
        raise VmError(f"VM {record.name}: cannot read QEMU's command line: {err}") from err
    return raw.decode(errors="replace").split("\0")[:-1]


def _option(argv: list[str], flag: str) -> str:
    try:
        return argv[argv.index(flag) + 1]
    except (ValueError, IndexError):
        raise VmError(f"QEMU of this VM was started without {flag}") from None


def guest_config(argv: list[str]) -> dict[str, Any]:
    """The boot configuration a restore must repeat, from the running QEMU's command line."""
    devices = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-device"]
    vsock = next((d for d in devices if f"id={VSOCK_DEVICE}," in d and "vsock" in d), None)
    if (
        vsock is None
        and "-incoming" in argv
        and any(d.startswith("pcie-root-port,id=" + VSOCK_PORT + ",") for d in devices)
        and "memory-backend=mem" in _option(argv, "-machine")
    ):
        vsock = vhost_user_vsock_device()  # a restored guest: its device was plugged over QMP
    if vsock is None or f"bus={VSOCK_PORT}" not in vsock:
        raise VmError(
            "its vsock device is not on a hot-pluggable root port "
            "(started by an older vsockrpc): start it again to snapshot it"
        )
    memory = _option(argv, "-m")
    if not memory.endswith("M"):
        raise VmError(f"unexpected memory size on QEMU's command line: {memory}")
    return {
        "memory_mib": int(memory[:-1]),
        "cpus": int(_option(argv, "-smp")),
        "accel": _option(argv, "-accel").split(",", 1)[0],  # the name; qemu_argv adds options
        "cpu": _option(argv, "-cpu"),
        "kernel": _option(argv, "-kernel"),
        "cmdline": _option(argv, "-append"),
        "vsock": vsock.split(",", 1)[0],  # vhost-user-vsock-pci | vhost-vsock-pci
    }


def _check_ready(record: VmRecord) -> None:
    if not record.running:
        raise VmError(f"VM {record.name} is not running ({record.status})")
    try:
        console = (record.run_dir / "console.log").read_text(errors="replace")
    except OSError:
        console = ""
    # A restored guest was ready when its snapshot was taken: its console starts after that.
    if markers.READY not in console and not record.state.get("restored_from"):
        raise VmError(f"VM {record.name}: its agent is not ready yet (no readiness on its console)")
    socket = record.state.get("hybrid_socket")
    if socket:  # the kernel device's address is AF_VSOCK: never connected from here
        try:
            rpc.wait_until_ready(
                HybridAddress(str(socket), int(record.state["port"])), timeout=READY_PROBE
            )
        except TransportError as err:
            raise VmError(f"VM {record.name}: its agent does not answer: {err}") from err


def _shrink(record: VmRecord) -> int | None:
    """Free the guest's page cache and zero its free pages (:data:`SHRINK_SCRIPT`), through
    its agent; bytes zeroed, or None for a guest on kernel vhost-vsock (its AF_VSOCK address
    is never connected from here). Best effort: a guest that refuses is saved as it is."""
    socket = record.state.get("hybrid_socket")
    if not socket:
        return None
    address = HybridAddress(str(socket), int(record.state["port"]))
    try:
        with rpc.channel(address) as channel:
            out = guest_python(
                channel, SHRINK_SCRIPT, what="freeing the page cache", timeout=SHRINK_TIMEOUT
            )
        return int(out.strip() or 0)
    except (VmError, ValueError, grpc.RpcError) as err:
        log.warning("VM %s: saved with its page cache: %s", record.name, err)
        return None


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VmError(f"{out} already exists and is not an empty directory")
    if not out.parent.is_dir():
        raise VmError(f"{out.parent} is not a directory")


def snapshot_vm(
    which: str,
    out: Path | str,
    *,
    stop: bool = False,
    shrink: bool = True,
    compressed: bool = False,
) -> SnapshotInfo:
    """Save VM ``which`` (name or CID) to the directory ``out``; resume it (or stop it).

    ``shrink``: first free the guest's page cache and zero its free memory (the snapshot then
    holds little more than the guest's used RAM; clones read files from disk again).
    ``compressed``: the RAM file compressed with zstd after the guest is resumed (about a
    third of its size; a clone then spends a few tenths of a second decompressing)."""
    out = Path(out)
    record = _find(which)
    _check_ready(record)
    _prepare_out(out)
    try:
        config = guest_config(_qemu_argv(record))
    except VmError as err:
        raise VmError(f"VM {record.name}: {err}") from err
    config["port"] = int(record.state["port"])
    userspace = config["vsock"] == "vhost-user-vsock-pci"
    zeroed = _shrink(record) if shrink else None
    created = not out.exists()
    out.mkdir(mode=0o700, exist_ok=True)
    state = out / STATE_FILE
    paused = 0.0

    async def save(s: Session) -> dict[str, Any]:
        nonlocal paused
        version = await s.run("query-version")
        machine = await s.run("qom-get", {"path": "/machine", "property": "type"})
        if userspace:
            await s.unplug(VSOCK_DEVICE)
        t = time.monotonic()
        await s.run("stop")
        try:
            if userspace:  # its RAM is a shared memfd: saved beside the stream, not in it
                await s.run("migrate-set-capabilities", IGNORE_SHARED)
            await s.run("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
            await s.wait_migration(MIGRATE_TIMEOUT)
            stats = await s.run("query-migrate")
            if userspace:
                size = int(config["memory_mib"]) << 20
                ram = find_guest_ram(record.qemu_pid, size)
                stats["ram_file_bytes"] = await asyncio.to_thread(
                    save_sparse, ram, out / RAM_FILE, size
                )
        except BaseException:
            await _resume(s, userspace)
            raise
        if not stop:
            await _resume(s, userspace)
        paused = time.monotonic() - t
        return {
            "version": version,
            "machine": machine,
            "ram": stats.get("ram", {}),
            "ram_file_bytes": stats.get("ram_file_bytes"),
            "zeroed": zeroed,
        }

    try:
        saved = run_session(record.run_dir / "qmp.sock", save)
        if compressed and (out / RAM_FILE).is_file():
            compress(out / RAM_FILE)
        manifest = _manifest(record, config, saved, state)
        tmp = out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.rename(out / MANIFEST)
    except BaseException:
        _remove_partial(out, created)
        raise
    if stop:
        with contextlib.suppress(VmError):
            run_session(record.run_dir / "qmp.sock", lambda s: s.run("quit"), timeout=10.0)
        stop_vm(record.name, timeout=5.0)
    return SnapshotInfo(out, manifest, paused)


async def _resume(s: Session, userspace: bool) -> None:
    await s.run("cont")
    if userspace:
        await s.run("device_add", device_add_args())


def device_add_args() -> dict[str, Any]:
    """``device_add`` arguments of :func:`vhost_user_vsock_device`'s ``-device`` value."""
    driver, *props = vhost_user_vsock_device().split(",")
    return {"driver": driver, **dict(p.split("=", 1) for p in props)}


def _manifest(
    record: VmRecord, config: dict[str, Any], saved: dict[str, Any], state: Path
) -> dict[str, Any]:
    image = Path(str(record.state["image"]))
    image_manifest = image / "manifest.json"
    q = saved["version"]["qemu"]
    ram = saved["ram"]
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"name": record.name, "cid": record.cid},
        "image": {
            "path": str(image),
            "key": json.loads(image_manifest.read_text()).get("key"),
            "digest": file_sha256(image_manifest),
        },
        "qemu": {
            "version": f"{q['major']}.{q['minor']}.{q['micro']}",
            "package": saved["version"].get("package", "").strip(),
            "machine": saved["machine"],
        },
        "guest": config,
        "device": {"driver": config["vsock"], "id": VSOCK_DEVICE, "bus": VSOCK_PORT},
        "ram": {
            "total_bytes": ram.get("total"),
            "transferred_bytes": ram.get("transferred"),
            "zero_pages": ram.get("duplicate"),
            "free_bytes_zeroed": saved["zeroed"],  # None: page cache not dropped
            "file_data_bytes": saved["ram_file_bytes"],  # None: RAM is in the state file
        },
        "files": {
            f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in (state, *(state.parent / name for name in RAM_FILES))
            if f.is_file()
        },
    }


def _remove_partial(out: Path, created: bool) -> None:
    """Remove what this snapshot wrote: the whole directory if it made it, else its files."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in (STATE_FILE, *RAM_FILES, MANIFEST, f".{MANIFEST}.tmp"):
        with contextlib.suppress(OSError):
            (out / name).unlink()
