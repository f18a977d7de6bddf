"""The private apt index the guest kernel's suite is read from: fetched once, refreshed when the
host's own index changes, and still used offline once it exists (apt itself is faked here;
tests/integration/test_image_kernel.py runs the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import debs

LINE = "deb http://mirror.example/debian bookworm-backports main"


class FakeApt:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, host_lists: Path) -> None:
        self.calls: list[list[str]] = []
        self.fail = False
        host_lists.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(
            debs,
            "_apt_lists_state",
            lambda lists=host_lists: debs.cache.digest(
                sorted(p.name for p in lists.glob("*Packages*"))
            ),
        )
        monkeypatch.setattr(debs, "_run", self.run)

    def run(self, argv: list[str], *, what: str, cwd: Path | None = None) -> str:
        self.calls.append(argv)
        if self.fail:
            raise ImageError(f"{what} failed: Could not resolve 'mirror.example'")
        lists = Path(next(a for a in argv if a.startswith("-oDir::State::Lists=")).split("=", 1)[1])
        assert (lists / "partial").is_dir()
        (lists / "mirror.example_bookworm-backports_main_binary-amd64_Packages").write_text("x")
        return ""


def test_fetched_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = FakeApt(monkeypatch, tmp_path / "host-lists")
    index = debs.private_index(LINE, root=tmp_path / "cache")
    (update,) = apt.calls
    assert update[0] == "apt-get" and update[-1] == "update"
    assert all(opt in update for opt in index.options)
    sources = Path(next(o for o in index.options if "SourceList=" in o).split("=", 1)[1])
    assert sources.read_text() == LINE + "\n"
    assert index.lists.is_relative_to(tmp_path / "cache")  # the host's apt state is untouched
    assert debs.private_index(LINE, root=tmp_path / "cache") == index
    assert len(apt.calls) == 1


def test_refreshed_when_the_hosts_index_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apt = FakeApt(monkeypatch, tmp_path / "host-lists")
    debs.private_index(LINE, root=tmp_path / "cache")
    (tmp_path / "host-lists" / "deb_bookworm_main_Packages").write_text("newer")
    debs.private_index(LINE, root=tmp_path / "cache")
    assert len(apt.calls) == 2


def test_offline_after_a_first_fetch_keeps_the_old_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apt = FakeApt(monkeypatch, tmp_path / "host-lists")
    first = debs.private_index(LINE, root=tmp_path / "cache")
    (tmp_path / "host-lists" / "deb_bookworm_main_Packages").write_text("newer")
    apt.fail = True
    assert debs.private_index(LINE, root=tmp_path / "cache") == first
    assert len(apt.calls) == 2


def test_offline_without_an_index_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apt = FakeApt(monkeypatch, tmp_path / "host-lists")
    apt.fail = True
    with pytest.raises(ImageError, match="Could not resolve"):
        debs.private_index(LINE, root=tmp_path / "cache")
    apt.fail = False  # the failed attempt left nothing that passes for an index
    debs.private_index(LINE, root=tmp_path / "cache")
    assert len(apt.calls) == 2


def test_lookups_pass_the_private_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = FakeApt(monkeypatch, tmp_path / "host-lists")
    index = debs.private_index(LINE, root=tmp_path / "cache")
    monkeypatch.setattr(debs.cache, "cache_root", lambda override=None: tmp_path / "cache")

    def show(argv: list[str], *, what: str, cwd: Path | None = None) -> str:
        apt.calls.append(argv)
        return "Package: k\nVersion: 6.12\nArchitecture: amd64\nSHA256: ab\n"

    monkeypatch.setattr(debs, "_run", show)
    pkg = debs._resolve_uncached("k", index)
    assert pkg == debs.DebPackage("k", "6.12", "amd64", "ab")
    assert apt.calls[-1][: 1 + len(index.options)] == ["apt-cache", *index.options]


def test_an_installed_candidate_without_a_download_falls_back_to_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The host installed a newer copy from another suite: apt's candidate is that dpkg record,
    # which has no SHA256; the version this index can download is the next record.
    installed = "Package: linux-source-6.12\nStatus: install ok installed\nVersion: 6.12.118\n"
    indexed = "Package: linux-source-6.12\nVersion: 6.12.95\nArchitecture: all\nSHA256: cd\n"
    asked: list[list[str]] = []

    def show(argv: list[str], *, what: str, cwd: Path | None = None) -> str:
        asked.append(argv)
        return installed if "--no-all-versions" in argv else f"{installed}\n{indexed}"

    monkeypatch.setattr(debs, "_run", show)
    pkg = debs._resolve_uncached("linux-source-6.12", debs.HOST_INDEX)
    assert pkg == debs.DebPackage("linux-source-6.12", "6.12.95", "all", "cd")
    assert len(asked) == 2


def test_a_package_no_index_can_download_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        debs, "_run", lambda argv, *, what, cwd=None: "Package: p\nVersion: 1\nStatus: ok\n"
    )
    with pytest.raises(ImageError, match="package p has no Architecture field"):
        debs._resolve_uncached("p", debs.HOST_INDEX)
