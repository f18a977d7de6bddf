"""Human output helpers shared by the subcommands: timed steps with progress lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


@contextmanager
def step(title: str, stream: TextIO = sys.stderr) -> Iterator[None]:
    """Print ``==> title`` now and ``    done in 1.23 s`` (or ``failed``) when the block ends."""
    print(f"==> {title}", file=stream, flush=True)
    start = time.monotonic()
    try:
        yield
    except BaseException:
        print(f"    failed after {time.monotonic() - start:.2f} s", file=stream, flush=True)
        raise
    print(f"    done in {time.monotonic() - start:.2f} s", file=stream, flush=True)
