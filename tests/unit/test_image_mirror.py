"""Reading the Debian mirror from apt's configuration, both formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import mirror

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no
"""

ONE_LINE = """\
# comment
deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main
deb https://packages.cloud.example/apt cloud-sdk-bookworm main
"""


def write_apt(tmp_path: Path) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    (etc / "sources.list").write_text(ONE_LINE)
    (etc / "sources.list.d" / "other.list.disabled").write_text(
        "deb http://x.example/ bookworm main"
    )
    return etc


def test_both_formats_are_read_and_disabled_entries_skipped(tmp_path: Path) -> None:
    sources = mirror.host_sources(write_apt(tmp_path))
    uris = [s.uri for s in sources]
    assert "http://mirror.example/debian" in uris
    assert "http://security.example/debian-security" in uris
    assert "http://one.example/debian" in uris
    assert "http://off.example/debian" not in uris  # Enabled: no
    assert "http://src.example/debian" not in uris  # deb-src
    assert "http://x.example/" not in uris  # not a .list file


def test_host_suites_map_onto_the_requested_release(tmp_path: Path) -> None:
    lines = mirror.mirror_lines("trixie", mirror.host_sources(write_apt(tmp_path)), "bookworm")
    assert lines == [
        "deb http://one.example/debian trixie main",
        "deb http://mirror.example/debian trixie main",
        "deb http://mirror.example/debian trixie-updates main",
        "deb http://security.example/debian-security trixie-security main",
    ]


def test_no_debian_source_is_a_clear_error() -> None:
    only_third_party = [mirror.AptSource("http://x.example/apt", ("cloud-sdk",), ("main",))]
    with pytest.raises(ImageError, match="no Debian mirror") as info:
        mirror.mirror_lines("bookworm", only_third_party, "bookworm")
    assert info.value.hint is not None and "--mirror" in info.value.hint


def test_codename_from_os_release(tmp_path: Path) -> None:
    f = tmp_path / "os-release"
    f.write_text('NAME="Debian GNU/Linux"\nVERSION_CODENAME=bookworm\n')
    assert mirror.host_codename(f) == "bookworm"
    assert mirror.host_codename(tmp_path / "missing") == ""


def test_signed_by_is_kept_from_both_formats(tmp_path: Path) -> None:
    by_uri = {s.uri: s for s in mirror.host_sources(write_apt(tmp_path))}
    assert by_uri["http://mirror.example/debian"].signed_by == (
        "/usr/share/keyrings/debian-archive-keyring.gpg"
    )
    assert by_uri["http://one.example/debian"].signed_by == "/k.gpg"  # [arch=… signed-by=…]
    assert by_uri["http://security.example/debian-security"].signed_by is None


def test_an_inline_signed_by_key_is_not_taken_for_a_path() -> None:
    text = (
        "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n"
    )
    (src,) = mirror._parse_deb822(text)
    assert src.uri == "http://m.example/debian" and src.signed_by is None


def test_backports_come_from_the_hosts_own_debian_mirror(tmp_path: Path) -> None:
    sources = mirror.host_sources(write_apt(tmp_path))
    # the first source naming the codename with main: one.example (sources.list comes first)
    assert mirror.backports_line(sources, "bookworm") == (
        "deb [signed-by=/k.gpg] http://one.example/debian bookworm-backports main"
    )
    deb822_only = [s for s in sources if s.uri != "http://one.example/debian"]
    assert mirror.backports_line(deb822_only, "bookworm") == (
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian bookworm-backports main"
    )
    # only a security or third-party suite, or no codename: no backports
    security = [s for s in sources if "security" in s.uri]
    assert mirror.backports_line(security, "bookworm") is None
    assert mirror.backports_line(sources, "") is None
    assert mirror.backports_line(sources, "trixie") is None
