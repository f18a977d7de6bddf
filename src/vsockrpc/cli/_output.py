"""Human output helpers shared by the subcommands: timed steps with progress lines, and what to
do when the reader of our output goes away (``vsockrpc exec ... | head``)."""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_OUTPUT_FDS = (1, 2)


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


def _closed_fds() -> list[int]:
    """Output fds (stdout, stderr) whose reader is gone: the next write fails with EPIPE.

    poll(2) reports POLLERR on the write end of a pipe without readers (``pipe_poll`` in the
    kernel's fs/pipe.c) and POLLHUP on a socket its peer shut down; neither needs a write.
    """
    closed = []
    for fd in _OUTPUT_FDS:
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR and POLLHUP are reported whatever is asked for
        try:
            events = poller.poll(0)
        except OSError:
            continue
        if any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events):
            closed.append(fd)
    return closed


def closed_output_pipe() -> bool:
    """Whether stdout or stderr lost its reader, i.e. a BrokenPipeError came from our output."""
    return bool(_closed_fds())


def detach_closed_output() -> None:
    """Point the closed output fds at /dev/null so that what is still buffered (and the
    interpreter's exit-time flush) goes nowhere quietly instead of raising again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in _closed_fds():
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)
