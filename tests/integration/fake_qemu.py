"""A stand-in for ``qemu-system-x86_64`` in launcher tests that need no guest.

It takes QEMU's command line, opens the QMP socket (``-qmp unix:PATH,...``), writes a console
line, and answers the few QMP commands the launcher sends: ``send-key`` (Ctrl-Alt-Del) and
``quit`` make it exit 0, like a guest powering off. ``FAKE_QEMU_MODE=die`` prints a QEMU-style
error on stderr after the QMP socket is up and exits 1 (a QEMU dying after start).
``FAKE_QEMU_MODE=mute-agent`` prints the agent's readiness line on the console, but nothing
answers behind the vsock device (the launcher then waits for a gRPC connection).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# What QEMU 7.2 sends a client first; the stand-in QMP servers of the tests send it too.
GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
        "capabilities": [],
    }
}


def qmp_commands(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """Greet the client on ``conn``, then yield each command it sends until it hangs up."""
    conn.sendall(json.dumps(GREETING).encode() + b"\n")
    decoder = json.JSONDecoder()
    buf = ""
    while chunk := conn.recv(4096):
        buf += chunk.decode()
        while buf.strip():  # QMP is a JSON stream: commands need no newline
            try:
                cmd, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield cmd


def reply(conn: socket.socket, cmd: dict[str, Any], value: object) -> None:
    """Answer ``cmd`` with ``{"return": value}`` (and its ``id``, if it had one)."""
    answer: dict[str, object] = {"return": value}
    if "id" in cmd:
        answer["id"] = cmd["id"]
    conn.sendall(json.dumps(answer).encode() + b"\n")


def serve_qmp(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            for cmd in qmp_commands(conn):
                reply(conn, cmd, {})
                if cmd.get("execute") in ("send-key", "quit"):
                    time.sleep(0.1)  # let the client read the reply
                    os._exit(0)


def main() -> None:
    argv = sys.argv[1:]
    qmp_path = option(argv, "-qmp")[0].removeprefix("unix:").split(",")[0]
    console = next(c for c in option(argv, "-chardev") if c.startswith("file,"))
    console_path = console.split("path=", 1)[1]
    with open(console_path, "a") as out:
        out.write("fake firmware\n")
        if os.environ.get("FAKE_QEMU_MODE") == "mute-agent":
            out.write("vsockrpc-guest: ready on vsock:-1:9999\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(qmp_path)
    listener.listen(1)
    if os.environ.get("FAKE_QEMU_MODE") == "die":
        time.sleep(0.2)
        print(
            "qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    serve_qmp(listener)


if __name__ == "__main__":
    main()
