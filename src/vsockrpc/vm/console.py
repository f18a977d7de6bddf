"""Following the guest's serial console: QEMU writes it to a file, a thread reads it.

Each complete line is kept with the time it was first seen (the boot phases are measured from
these), and optionally echoed to a stream (``vm run`` in the foreground).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TextIO

__all__ = ["ConsoleFollower"]

_POLL = 0.02


class ConsoleFollower:
    def __init__(self, path: Path, *, echo: TextIO | None = None) -> None:
        self.path = path
        self._echo = echo
        self._lines: list[tuple[float, str]] = []
        self._first_byte: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vm-console", daemon=True)

    def start(self) -> ConsoleFollower:
        self._thread.start()
        return self

    def _run(self) -> None:
        pending = b""
        offset = 0
        while True:
            stopping = self._stop.is_set()
            try:
                with self.path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                now = time.monotonic()
                with self._lock:
                    if self._first_byte is None:
                        self._first_byte = now
                *complete, pending = (pending + chunk).split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace").replace("\r", "")
                    with self._lock:
                        self._lines.append((now, line))
                    if self._echo is not None:
                        print(line, file=self._echo, flush=True)
            if stopping:
                return
            self._stop.wait(_POLL)

    @property
    def first_byte(self) -> float | None:
        with self._lock:
            return self._first_byte

    def lines(self) -> list[str]:
        with self._lock:
            return [line for _, line in self._lines]

    def text(self) -> str:
        return "".join(f"{line}\n" for line in self.lines())

    def seen(self, needle: str) -> float | None:
        """When the first line containing ``needle`` appeared (monotonic), or None."""
        with self._lock:
            for when, line in self._lines:
                if needle in line:
                    return when
        return None

    def close(self) -> None:
        """Read what is left, then stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def __enter__(self) -> ConsoleFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
