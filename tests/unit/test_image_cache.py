"""The content-addressed cache: stable keys, atomic publication, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import cache


def test_digest_ignores_dict_order_but_not_values() -> None:
    assert cache.digest({"a": 1, "b": [1, 2]}) == cache.digest({"b": [1, 2], "a": 1})
    assert cache.digest({"a": 1}) != cache.digest({"a": 2})


def test_tree_digest_sees_content_names_and_exec_bits_not_pycache(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    f = tmp_path / "pkg" / "m.py"
    f.write_text("x = 1\n")
    first = cache.tree_digest(tmp_path)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"junk")
    assert cache.tree_digest(tmp_path) == first
    f.chmod(0o755)
    assert cache.tree_digest(tmp_path) != first
    f.chmod(0o644)
    f.write_text("x = 2\n")
    assert cache.tree_digest(tmp_path) != first


def test_entry_appears_only_when_the_build_succeeds(tmp_path: Path) -> None:
    entry = cache.entry("things", "k1", root=tmp_path)
    with pytest.raises(RuntimeError), entry.lock(), entry.build() as tmp:
        (tmp / "half").write_text("half-written")
        raise RuntimeError("build failed")
    assert not entry.exists
    assert list((tmp_path / "things").iterdir()) == [tmp_path / "things" / "k1.lock"]
    with entry.lock(), entry.build() as tmp:
        (tmp / "whole").write_text("done")
    assert entry.exists
    assert (entry.path / "whole").read_text() == "done"


def test_interrupt_leaves_nothing_half_written(tmp_path: Path) -> None:
    entry = cache.entry("things", "k2", root=tmp_path)
    with pytest.raises(KeyboardInterrupt), entry.build() as tmp:
        (tmp / "part").write_bytes(b"x")
        raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "things").iterdir()] == []


def test_unwritable_cache_root_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ImageError, match="not writable") as info:
        cache.cache_root(blocker / "cache")
    assert info.value.hint is not None and "VSOCKRPC_CACHE" in info.value.hint


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VSOCKRPC_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == (tmp_path / "c").resolve()
    assert (tmp_path / "c").is_dir()
