"""Helpers for the `vsockrpc serve` hardening tests: a CLI server process, and gRPC calls made
over a Unix connection that another user opened (SO_PEERCRED is fixed at connect())."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from vsockrpc.rpc._relay import Relay

CLI = [sys.executable, "-m", "vsockrpc.cli.main"]
NOBODY = 65534


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A fresh 0755 directory under /tmp that another user can traverse (pytest's is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vsockrpc-test-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def cli_server(
    listen: str,
    *options: str,
    setup: str | None = None,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """``vsockrpc serve --listen LISTEN OPTIONS…`` until it printed its address; stopped after.
    Its stderr goes to ``log`` (a temporary file without one), shown if it fails to start.

    ``setup``: shell commands run before the server replaces the shell (``umask 000``,
    ``ulimit -S -n 1024``). Not a ``preexec_fn``: that makes CPython fork() this process, which
    has grpcio loaded, and run grpcio's at-fork handlers; the restarted poller thread in the
    child then met its epoll fd closed by ``close_fds`` and aborted the child before exec
    (grpc/grpc#43055): 1 failed start in several hundred, exit status -6, an ``epoll_wait
    error: Bad file descriptor`` line (vsockrpc itself spawns without a ``preexec_fn`` for the
    same reason: services/agent/spawn.py, vm/procs.py)."""
    with contextlib.ExitStack() as stack:
        if log is None:
            stderr = stack.enter_context(tempfile.TemporaryFile("w+"))
        else:
            stderr = stack.enter_context(log.open("w+"))
        argv = [*CLI, "serve", "--listen", listen, *options]
        if setup is not None:
            argv = ["sh", "-c", f'{setup} && exec "$@"', "sh", *argv]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
        stack.callback(_stop, proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            # The exit status tells a server that failed (1, 2, with its one line on stderr)
            # from one that something else killed before it said a word (a negative signal).
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            stderr.seek(0)
            raise AssertionError(
                f"serve did not start (exit status {proc.returncode}): {line!r} "
                f"{stderr.read()[-2000:]}"
            )
        yield proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def connect_as(uid: int, path: str) -> socket.socket:
    """A Unix connection to ``path`` opened by a child running as ``uid`` (gid = uid), handed
    back over SCM_RIGHTS. Raises the child's OSError (e.g. PermissionError) when it can't."""
    parent_end, child_end = socket.socketpair()
    with parent_end, child_end:
        pid = os.fork()
        if pid == 0:  # the child: no grpc here, only system calls, then _exit
            status = 0
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                socket.send_fds(child_end, [b"0"], [sock.fileno()])
            except OSError as err:
                child_end.send(str(err.errno).encode())
                status = 1
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        data, fds, _, _ = socket.recv_fds(parent_end, 16, 1)
    if fds:
        return socket.socket(fileno=fds[0])
    errno_ = int(data)
    raise OSError(errno_, os.strerror(errno_))


@contextlib.contextmanager
def channel_over(sock: socket.socket, directory: Path) -> Iterator[grpc.Channel]:
    """A grpc channel whose (first) connection is ``sock``: grpcio dials a local socket and a
    one-shot relay splices it to ``sock``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(directory / f"over-{os.getpid()}-{sock.fileno()}.sock")
    listener.bind(path)
    listener.listen(4)
    handed: list[socket.socket] = [sock]

    def dial(_conn: socket.socket, _peer: object) -> socket.socket:
        if not handed:
            raise OSError("the connection was used already")
        return handed.pop()

    with Relay(listener, dial, name="test-over"):
        channel = grpc.insecure_channel(f"unix:{path}")
        try:
            yield channel
        finally:
            channel.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    for leftover in handed:
        leftover.close()


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], check=False, capture_output=True, text=True, timeout=timeout
    )
