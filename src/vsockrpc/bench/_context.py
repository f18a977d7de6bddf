"""What every part gets: the run's options, a progress line printer, a scratch directory, and
helpers for the server processes the parts measure against."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vsockrpc.errors import VsockRpcError
from vsockrpc.vm.procs import popen_dying_with_parent


@dataclass
class Context:
    quick: bool
    progress: Callable[[str], None]
    workdir: Path  # removed by the suite when it ends

    def step(self, part: str, what: str) -> None:
        self.progress(f"[{part}] {what}")


@contextlib.contextmanager
def server_process(argv: list[str], socket_path: str, what: str) -> Iterator[int]:
    """Run ``argv`` (a server that listens on ``socket_path``); yield its pid once the socket
    exists; stop it (SIGTERM, then SIGKILL) when the block ends."""
    proc = popen_dying_with_parent(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(socket_path):
            if proc.poll() is not None:
                raise VsockRpcError(f"{what} exited with status {proc.returncode} at start")
            if time.monotonic() > deadline:
                raise VsockRpcError(f"{what} did not listen within 60 s")
            time.sleep(0.02)
        yield proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the bench servers stop at EOF on stdin
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_server(kind: str, socket_path: str) -> list[str]:
    """argv of one of :mod:`vsockrpc.bench._servers` on ``unix:socket_path``."""
    return [sys.executable, "-m", "vsockrpc.bench._servers", kind, socket_path]
