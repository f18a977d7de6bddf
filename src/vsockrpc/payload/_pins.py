"""Which distributions a guest needs, and at which versions (one pinning rule).

The rule: a distribution pinned with ``==`` in ``requirements/constraints.txt`` (present in a
checkout) gets that version; any other gets the version installed next to this package. The
image and the bundle both ask here, so a guest image and a bundle built from one checkout
carry the same wheels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from vsockrpc.errors import PayloadError

__all__ = ["GUEST_DISTRIBUTIONS", "constraints_file", "normalize", "pinned_versions"]

# What the guest side imports beyond the standard library: grpc (which imports
# typing_extensions), google.protobuf, grpc_health, grpc_reflection.
GUEST_DISTRIBUTIONS = (
    "grpcio",
    "protobuf",
    "grpcio-health-checking",
    "grpcio-reflection",
    "typing-extensions",
)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def normalize(name: str) -> str:
    """``name`` in canonical form (PEP 503): ``Typing_Extensions`` → ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints_file() -> Path | None:
    """``requirements/constraints.txt`` of the checkout this package runs from, if any."""
    candidate = _PACKAGE_DIR.parents[1] / "requirements" / "constraints.txt"
    return candidate if candidate.is_file() else None


def _constraints(path: Path | None) -> dict[str, str]:
    pins: dict[str, str] = {}
    if path is None:
        return pins
    for raw in path.read_text().splitlines():
        name, sep, version = raw.split("#", 1)[0].strip().partition("==")
        if sep and name.strip():
            pins[normalize(name.strip())] = version.strip()
    return pins


def pinned_versions(
    names: Iterable[str] = GUEST_DISTRIBUTIONS, *, constraints: Path | None = None
) -> dict[str, str]:
    """``name -> version`` for ``names``: from ``constraints`` (default: the checkout's
    constraints.txt, when there is one), else the installed version."""
    pinned = _constraints(constraints if constraints is not None else constraints_file())
    out: dict[str, str] = {}
    for name in names:
        key = normalize(name)
        if key in pinned:
            out[key] = pinned[key]
            continue
        try:
            out[key] = metadata.version(key)
        except metadata.PackageNotFoundError as err:
            raise PayloadError(
                f"cannot pin the guest's {key}: not in requirements/constraints.txt "
                "and not installed here",
                hint=f"pip install {key}",
            ) from err
    return out
