"""What the figures were measured on: CPU, kernel, QEMU, versions, load, which vsock path."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def qemu_version() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return "not installed"
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    return out.splitlines()[0].strip() if out else "unknown"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def host_vsock_paths() -> dict[str, str]:
    """Which devices a guest booted here could use. Presence only: whether KVM really boots a
    guest is the launcher's probe, and each part's path states what its guests used."""
    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    vhost = os.path.exists("/dev/vhost-vsock")
    return {
        "/dev/kvm": "present (the launcher probes whether KVM boots)" if kvm else "absent: TCG",
        "/dev/vhost-vsock": (
            "present" if vhost else "absent: guests use vsockrpc's userspace device"
        ),
    }


def describe() -> dict[str, Any]:
    import grpc

    from vsockrpc import __version__

    try:
        import google.protobuf

        protobuf = google.protobuf.__version__
    except ImportError:  # pragma: no cover - a dependency
        protobuf = "missing"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count() or 0,
        "kernel": f"{platform.system()} {platform.release()}",
        "qemu": qemu_version(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "protobuf": protobuf,
        "vsockrpc": __version__,
        "load_before": load_average(),
        **host_vsock_paths(),
    }
