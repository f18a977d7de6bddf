"""Typed reads of one TOML table, each failure one line naming the file, the line and the key.

:class:`Table` wraps a parsed table with where it came from; its getters (``string``,
``integer``, ``strings``…) return the value or raise :class:`SpecError` such as::

    vsockrpc.toml:7: memory: expected a positive integer, got a string ("lots")

and :meth:`Table.done` rejects keys nobody asked for (unknown keys are typos, not options).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vsockrpc.errors import SpecError
from vsockrpc.payload._toml_lines import KeyLines

__all__ = ["Source", "Table"]

KeyPath = tuple[str | int, ...]

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "a table",
}


def _describe(value: object) -> str:
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
        shown = text if len(text) <= 40 else text[:37] + "..."
        return f"{kind} ({shown})"
    return kind


def dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class Source:
    """The spec file being read: its path (as the user named it) and its key lines."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = KeyLines(text)

    def error(self, path: KeyPath, message: str) -> SpecError:
        line = self.lines.line(path)
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        key = f"{dotted(path)}: " if path else ""
        return SpecError(f"{where}: {key}{message}")


class Table:
    """One table of the spec; remembers which keys were read."""

    def __init__(self, source: Source, path: KeyPath, data: Mapping[str, Any]) -> None:
        self.source = source
        self.path = path
        self.data = data
        self._seen: set[str] = set()

    def error(self, key: str | int | None, message: str) -> SpecError:
        return self.source.error(self.path if key is None else (*self.path, key), message)

    def _get(self, key: str, kinds: tuple[type, ...], expected: str) -> Any:
        self._seen.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {expected}, got {_describe(value)}")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {expected}, got {_describe(value)}")
        return value

    def has(self, key: str) -> bool:
        return key in self.data

    def string(self, key: str, *, required: bool = False) -> str | None:
        value: str | None = self._get(key, (str,), "a string")
        if value is None and required:
            raise self.error(None, f"missing key {key!r} (a string)")
        return value

    def boolean(self, key: str) -> bool | None:
        value: bool | None = self._get(key, (bool,), "true or false")
        return value

    def positive(self, key: str) -> int | None:
        value: int | None = self._get(key, (int,), "a positive integer")
        if value is not None and value <= 0:
            raise self.error(key, f"expected a positive integer, got {value}")
        return value

    def strings(self, key: str, *, required: bool = False) -> list[str] | None:
        value: list[Any] | None = self._get(key, (list,), "an array of strings")
        if value is None:
            if required:
                raise self.error(None, f"missing key {key!r} (an array of strings)")
            return None
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(key, f"[{index}]: expected a string, got {_describe(item)}")
        return value

    def table(self, key: str) -> Table | None:
        value: dict[str, Any] | None = self._get(key, (dict,), "a table")
        return None if value is None else Table(self.source, (*self.path, key), value)

    def tables(self, key: str) -> list[Table]:
        value: list[Any] | None = self._get(key, (list,), f"an array of tables ([[{key}]])")
        out = []
        for index, item in enumerate(value or []):
            if not isinstance(item, dict):
                raise self.error(
                    key, f"[{index}]: expected a table ([[{key}]]), got {_describe(item)}"
                )
            out.append(Table(self.source, (*self.path, key, index), item))
        return out

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self.data.get(key)

    def done(self, allowed_hint: str) -> None:
        """Reject every key not read (a typo or an option that does not exist)."""
        for key in self.data:
            if key not in self._seen:
                raise self.error(key, f"unknown key (expected one of: {allowed_hint})")
