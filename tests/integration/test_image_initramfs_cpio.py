"""The newc writer's archive, read back by cpio(1) itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_image_initramfs import sample
from vsockrpc.image.initramfs import write_newc


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_reads_it_back(tmp_path: Path) -> None:
    archive = write_newc(sample(), mtime=1_700_000_000)
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    names = [
        line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()
    ]
    assert names == ["bin", "bin/sh", "dev", "dev/console", "init", "odd"]
    assert "5,   1" in listing or "5, 1" in listing  # the console's device numbers
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=out,
        check=True,
        capture_output=True,
    )
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "odd").read_bytes() == b"abc"
    assert (out / "bin" / "sh").readlink() == Path("busybox")
