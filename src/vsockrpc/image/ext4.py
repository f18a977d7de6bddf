"""The root filesystem image: ext4 made from a directory with ``mkfs.ext4 -d`` (no mount,
no loop device).

Read-only in the guest, so no journal. For repeatable bytes the UUID and directory-hash seed
are derived from the image key and ``E2FSPROGS_FAKE_TIME`` pins the superblock times
(e2fsprogs reads it in ``lib/ext2fs`` for exactly this purpose). ``mkfs.ext4 -d`` copies each
source file's ctime, which no one can set on the host, and its atime, which reading the tree
just updated (relatime), so afterwards every inode's ctime and atime are rewritten to the epoch
with one batched ``debugfs -w`` run (``set_inode_field``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from vsockrpc.errors import ImageError

__all__ = ["make_ext4"]

_SLACK = 1.15
_EXTRA_BYTES = 16 << 20


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        total += 4096
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += (st.st_size + 4095) // 4096 * 4096
    return total


def make_ext4(src: Path, out: Path, *, key: str, epoch: int) -> None:
    if shutil.which("mkfs.ext4") is None:
        raise ImageError("mkfs.ext4 not found", hint="apt-get install e2fsprogs")
    size_kib = int(_tree_bytes(src) * _SLACK + _EXTRA_BYTES) // 1024
    fs_uuid = str(uuid.UUID(key[:32]))
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "vsockrpc-root",
        "-U",
        fs_uuid,
        "-O",
        "^has_journal",
        "-m",
        "0",
        "-I",
        "256",
        "-E",
        f"hash_seed={fs_uuid},root_owner=0:0,lazy_itable_init=0",
        "-d",
        str(src),
        str(out),
        f"{size_kib}k",
    ]
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise ImageError(f"mkfs.ext4 failed: {proc.stderr.strip() or proc.returncode}")
    _pin_ctimes(src, out, epoch, env)


def _pin_ctimes(src: Path, image: Path, epoch: int, env: dict[str, str]) -> None:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch))
    commands = [f"sif / ctime {stamp}", f"sif / atime {stamp}"]
    for dirpath, dirnames, filenames in os.walk(src):
        for name in sorted((*dirnames, *filenames)):
            rel = "/" + os.path.relpath(os.path.join(dirpath, name), src)
            if '"' in rel or "\n" in rel:
                raise ImageError(f"cannot pin the ctime of {rel!r}: unusual file name")
            commands.append(f'sif "{rel}" ctime {stamp}')
            commands.append(f'sif "{rel}" atime {stamp}')
    with tempfile.NamedTemporaryFile("w", prefix="vsockrpc-debugfs-", suffix=".cmd") as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        proc = subprocess.run(
            ["debugfs", "-w", "-f", script.name, str(image)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    errors = [ln for ln in proc.stderr.splitlines() if "debugfs" not in ln and ln.strip()]
    if proc.returncode != 0 or errors:
        raise ImageError(f"debugfs failed pinning ctimes: {(errors or [str(proc.returncode)])[0]}")
