"""Line numbers for the keys of a TOML document (``tomllib`` reports none for valid input).

An error about a value should point at the line the user wrote it on. This scans the text once
and maps each key path — ``("memory",)``, ``("copy", 0, "source")``, ``("env", "HOME")`` — to
the line of its ``key =`` (or of its ``[table]``/``[[array]]`` header). It understands what an
image spec uses: top-level keys, ``[table]``, ``[[array of tables]]``, dotted and quoted keys;
a value nested inside an inline table or a multi-line array maps to the line of its key
(:meth:`KeyLines.line` falls back to the longest known prefix). Written here because no
maintained TOML parser for Python returns source positions of keys.
"""

from __future__ import annotations

import re

__all__ = ["KeyLines"]

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _split_key(text: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


class KeyLines:
    """Key path → 1-based line number for one TOML text."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path, int] = {}
        table: Path = ()
        counts: dict[tuple[str, ...], int] = {}
        in_string = False
        for number, line in enumerate(text.splitlines(), start=1):
            # Skip the inside of multi-line strings (a line there is no key).
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                was_inside = in_string
                in_string = not in_string
                if was_inside:
                    continue
            elif in_string:
                continue
            header = _HEADER.match(line)
            if header is not None and "=" not in header.group(2):
                names = tuple(_split_key(header.group(2)))
                if header.group(1) == "[[":
                    index = counts.get(names, 0)
                    counts[names] = index + 1
                    table = (*names, index)
                else:
                    table = names
                self._lines.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key is not None:
                self._lines.setdefault((*table, *_split_key(key.group(1))), number)

    def line(self, path: Path) -> int | None:
        """The line of ``path``, else of its longest known prefix, else None."""
        for end in range(len(path), 0, -1):
            found = self._lines.get(path[:end])
            if found is not None:
                return found
        return None
