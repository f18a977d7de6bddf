"""Keep grpc core's own log lines off the terminal.

By default they are off: ``vsockrpc/__init__.py`` sets ``GRPC_VERBOSITY=NONE`` unless the
environment chose a level (grpc reads it once, when it is imported; a program that imports grpc
before vsockrpc sets it itself).

Capture what grpc core logs to fd 2 during a call (a failed bind logs ``E... add_port.cc``).

grpc core writes straight to file descriptor 2, below Python's ``sys.stderr``, so the only way
to keep a failed bind from printing a second, differently formatted error line (or the native
vsock probe from printing one at all) is to point fd 2 elsewhere for the duration of the call.
Other threads' stderr output in that window is captured too; callers re-emit it when it was not
an error they turned into an exception.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["CapturedStderr", "capturing_stderr"]


class CapturedStderr:
    text = ""

    def reason(self) -> str | None:
        """The message of grpc core's last ``add_port`` error line, if any."""
        lines = [line for line in self.text.splitlines() if "] " in line]
        if not lines:
            return None
        message = lines[-1].split("] ", 1)[1].strip()
        return message.removeprefix("Failed to add port to server: ")

    def replay(self) -> None:
        if self.text:
            sys.stderr.write(self.text)
            sys.stderr.flush()


@contextlib.contextmanager
def capturing_stderr() -> Iterator[CapturedStderr]:
    captured = CapturedStderr()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved, 2)
                scratch.seek(0)
                captured.text = scratch.read().decode(errors="replace")
    finally:
        os.close(saved)
