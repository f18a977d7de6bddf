"""Where the guest kernel comes from: the host release's backports, else the host's own index
(with a log line saying why)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vsockrpc.errors import ImageError
from vsockrpc.image import debs, kernel, mirror

DEBIAN = [mirror.AptSource("http://m.example/debian", ("bookworm",), ("main",))]


def fake_host(monkeypatch: pytest.MonkeyPatch, sources: list[mirror.AptSource]) -> list[str]:
    asked: list[str] = []
    monkeypatch.setattr(mirror, "host_codename", lambda: "bookworm")
    monkeypatch.setattr(mirror, "host_sources", lambda: sources)

    def private(line: str, *, root: Path | None = None) -> debs.AptIndex:
        asked.append(line)
        return debs.AptIndex(("-oDir::State::Lists=/x",), Path("/x"))

    monkeypatch.setattr(debs, "private_index", private)
    return asked


def test_backports_of_the_hosts_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_host(monkeypatch, DEBIAN)
    index = kernel.kernel_index()
    assert asked == ["deb http://m.example/debian bookworm-backports main"]
    assert index != debs.HOST_INDEX


def test_no_debian_mirror_keeps_the_hosts_index(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    third_party = [mirror.AptSource("http://x.example/apt", ("cloud-sdk",), ("main",))]
    asked = fake_host(monkeypatch, third_party)
    with caplog.at_level(logging.INFO, logger="vsockrpc.image.kernel"):
        assert kernel.kernel_index() == debs.HOST_INDEX
    assert asked == [] and "no Debian mirror for bookworm-backports" in caplog.text


def test_unreachable_backports_keep_the_hosts_index(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_host(monkeypatch, DEBIAN)

    def offline(line: str, *, root: Path | None = None) -> debs.AptIndex:
        raise ImageError("fetching the index of … failed: Could not resolve 'm.example'")

    monkeypatch.setattr(debs, "private_index", offline)
    with caplog.at_level(logging.WARNING, logger="vsockrpc.image.kernel"):
        assert kernel.kernel_index() == debs.HOST_INDEX
    assert "Could not resolve" in caplog.text and "using the host's index" in caplog.text
