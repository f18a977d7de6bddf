"""The root filesystem image: same tree → same bytes, whatever the host's file times."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from vsockrpc.image import rootfs
from vsockrpc.image.ext4 import make_ext4

pytestmark = pytest.mark.timeout(60)
EPOCH = 1_700_000_000
KEY = "0123456789abcdef" * 4


def make_tree(root: Path) -> None:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (root / "usr" / "bin" / "tool").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "name with space").write_text("x")
    (root / "bin").symlink_to("usr/bin")


def test_equal_trees_give_byte_identical_images(tmp_path: Path) -> None:
    images = []
    for n in range(2):
        tree = tmp_path / f"tree{n}"
        make_tree(tree)
        rootfs.clamp_mtimes(tree, EPOCH)
        os.listdir(tree / "usr")  # reading updates atimes; the image must not care
        image = tmp_path / f"root{n}.ext4"
        make_ext4(tree, image, key=KEY, epoch=EPOCH)
        images.append(image.read_bytes())
        time.sleep(1.1)  # the second tree gets other ctimes
    assert images[0] == images[1]


def test_files_times_and_links_survive(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    rootfs.clamp_mtimes(tree, EPOCH)
    image = tmp_path / "root.ext4"
    make_ext4(tree, image, key=KEY, epoch=EPOCH)
    out = subprocess.run(
        ["debugfs", "-R", "stat /usr/bin/tool", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Mode:  0755" in out
    for field in ("ctime", "atime", "mtime"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{field}:"))
        assert f"0x{EPOCH:x}" in line, line
    cat = subprocess.run(
        ["debugfs", "-R", "cat /usr/bin/tool", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert cat == "#!/bin/sh\necho tool\n"
