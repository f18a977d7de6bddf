"""Argument types the subcommands share: argparse reports their errors as
``argument --flag: ...`` and exits 2."""

from __future__ import annotations

import argparse

from vsockrpc._checks import seconds as _check_seconds
from vsockrpc.errors import BadInputError

__all__ = ["KERNELS", "seconds", "seconds_or_zero"]

# --kernel's choices: vsockrpc.payload.spec.KERNELS, repeated so that building the parser
# does not import the image spec's parser (a test checks they agree).
KERNELS = ("debian", "tailored")


def _parse(text: str, *, zero: bool) -> float:
    least = "0 or more" if zero else "more than 0"
    try:
        return _check_seconds(float(text), "", zero=zero)
    except (ValueError, BadInputError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds ({least})") from None


def seconds(text: str) -> float:
    """A finite number of seconds above 0 (a deadline, a timeout)."""
    return _parse(text, zero=False)


def seconds_or_zero(text: str) -> float:
    """A finite number of seconds, 0 or more (0: do not wait)."""
    return _parse(text, zero=True)
