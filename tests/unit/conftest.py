"""The unit tier is pure logic: a unit test that opens a socket or starts a process fails.

Such a test belongs in tests/integration/. The guard patches the Python-level entry points
(every stdlib path to a socket goes through ``socket.socket``; every child process through
``subprocess.Popen``, ``os.fork`` or ``os.posix_spawn``) and fails the test through
``pytest.fail``, which a ``except Exception`` in the code under test cannot swallow.
grpcio's core makes its sockets in C, out of sight of that patch, so the guard also refuses
``grpc.server`` and the channel constructors (sync and aio).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import NoReturn

import grpc
import grpc.aio
import pytest


def _refuse(what: str) -> Callable[..., NoReturn]:
    def refuse(*_args: object, **_kwargs: object) -> NoReturn:
        pytest.fail(f"a unit test {what}: move it to tests/integration/", pytrace=True)

    return refuse


@pytest.fixture(autouse=True)
def _no_sockets_or_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(socket.socket, "__init__", _refuse("opened a socket"))
    # socketpair() makes both fds before wrapping them: refuse it before they exist.
    monkeypatch.setattr(socket, "socketpair", _refuse("opened a socket"))
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse("started a process"))
    for module in (grpc, grpc.aio):
        monkeypatch.setattr(module, "server", _refuse("started a gRPC server"))
        for name in ("insecure_channel", "secure_channel"):
            monkeypatch.setattr(module, name, _refuse("opened a gRPC channel"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse("started a process"))
    yield
