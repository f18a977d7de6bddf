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


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def serve_qmp(listener: socket.socket) -> None:
    decoder = json.JSONDecoder()
    greeting = {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
            "capabilities": [],
        }
    }
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(json.dumps(greeting).encode() + b"\n")
            buf = ""
            while chunk := conn.recv(4096):
                buf += chunk.decode()
                while buf.strip():  # QMP is a JSON stream: commands need no newline
                    try:
                        cmd, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    reply: dict[str, object] = {"return": {}}
                    if "id" in cmd:
                        reply["id"] = cmd["id"]
                    conn.sendall(json.dumps(reply).encode() + b"\n")
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
