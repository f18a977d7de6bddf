"""The Debian mirror as the host's apt is configured (``/etc/apt/sources.list*``).

Both formats are read: one-line ``deb [opts] URI SUITE COMPONENT...`` (``*.list``) and deb822
stanzas (``*.sources``: ``Types``/``URIs``/``Suites``/``Components``/``Enabled``). The host's
own release (``VERSION_CODENAME`` in os-release) is mapped to the requested one, so a bookworm
host configured with ``bookworm``, ``bookworm-updates`` and ``bookworm-security`` yields the same
three suites for ``--release trixie``. No host is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import ImageError

__all__ = ["AptSource", "backports_line", "host_codename", "host_sources", "mirror_lines"]


@dataclass(frozen=True, slots=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None  # the keyring apt checks this source against, if pinned


def _parse_one_line(text: str) -> list[AptSource]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = line.split()[1:]
        signed_by = None
        if words and words[0].startswith("["):  # [arch=amd64 signed-by=...]
            while words:
                option = words.pop(0)
                key, _, value = option.strip("[]").partition("=")
                if key == "signed-by":
                    signed_by = value
                if option.endswith("]"):
                    break
        if len(words) >= 3:
            out.append(AptSource(words[0], (words[1],), tuple(words[2:]), signed_by))
    return out


def _parse_deb822(text: str) -> list[AptSource]:
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key:
                fields[key] += " " + raw.strip()
                continue
            key, sep, value = raw.partition(":")
            if sep:
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(
                AptSource(
                    uri,
                    tuple(fields.get("suites", "").split()),
                    tuple(fields.get("components", "").split()),
                    _keyring(fields.get("signed-by", "")),
                )
            )
    return out


def _keyring(signed_by: str) -> str | None:
    """A Signed-By naming keyring files; an inline key block (deb822 allows one) is dropped,
    so that apt falls back to its trusted keyrings."""
    return signed_by if signed_by.startswith("/") else None


def host_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every enabled ``deb`` source the host's apt uses."""
    sources: list[AptSource] = []
    files = [etc_apt / "sources.list"]
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(parts.iterdir())
    for path in files:
        if not path.is_file():
            continue
        if path.suffix == ".list" or path.name == "sources.list":
            sources += _parse_one_line(path.read_text(errors="replace"))
        elif path.suffix == ".sources":
            sources += _parse_deb822(path.read_text(errors="replace"))
    return sources


def host_codename(os_release: Path = Path("/etc/os-release")) -> str:
    try:
        for line in os_release.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME":
                return value.strip().strip('"')
    except OSError:
        pass
    return ""


def mirror_lines(release: str, sources: list[AptSource], codename: str) -> list[str]:
    """``deb URI SUITE main`` lines for ``release``, derived from the host's Debian sources.

    A source qualifies when one of its suites is the host codename or ``codename-<pocket>`` and
    it has the ``main`` component; third-party repositories (other suite names) are skipped.
    """
    lines: list[str] = []
    for src in sources:
        if "main" not in src.components:
            continue
        for suite in src.suites:
            base, dash, pocket = suite.partition("-")
            if base != codename:
                continue
            line = f"deb {src.uri} {release}{dash}{pocket} main"
            if line not in lines:
                lines.append(line)
    if not any(line.split()[2] == release for line in lines):
        raise ImageError(
            f"no Debian mirror for {codename or 'this host'} in /etc/apt/sources.list*",
            hint="pass --mirror URI (a Debian archive mirror)",
        )
    return lines


def backports_line(sources: list[AptSource], codename: str) -> str | None:
    """``deb URI <codename>-backports main`` on the host's own Debian mirror, or None.

    The mirror is a source carrying the host codename itself with ``main`` (not a security or
    third-party one); its ``signed-by`` keyring, if any, is kept.
    """
    for src in sources:
        if codename and codename in src.suites and "main" in src.components:
            options = f"[signed-by={src.signed_by}] " if src.signed_by else ""
            return f"deb {options}{src.uri} {codename}-backports main"
    return None
