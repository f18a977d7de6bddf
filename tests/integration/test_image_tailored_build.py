"""The tailored kernel's build steps against real tools: a step that fails names itself in
one line and leaves no source tree behind (the whole build: tests/vm/test_tailored_kernel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import tailored


def test_a_failed_step_names_itself_and_leaves_no_tree(tmp_path: Path) -> None:
    tarball = tmp_path / "linux-source-6.12.tar.xz"
    tarball.write_bytes(b"not an archive")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageError, match="tailored kernel: unpacking failed: "):
        tailored._build(tarball, out)
    assert [p.name for p in out.iterdir()] == ["build.log"]  # the source tree went
    assert "tar" in (out / "build.log").read_text()
