"""Argument checks the public API and the command lines share (standard library only)."""

from __future__ import annotations

import argparse
import math

from vsockrpc.errors import BadInputError

__all__ = ["positive_int", "seconds"]


def seconds(value: float, what: str, *, zero: bool = False) -> float:
    """``value`` if it is a finite number of seconds above 0 (``zero``: 0 too), else
    :class:`BadInputError` naming ``what``. NaN, infinities and negatives would reach gRPC's
    deadlines or socket timeouts and fail there, far from the caller's mistake."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and (value >= 0 if zero else value > 0)):
        least = "0 or more" if zero else "more than 0"
        raise BadInputError(f"{what} must be a number of seconds, {least}: not {value!r}")
    return float(value)


def positive_int(text: str) -> int:
    """An argparse type: a whole number, 1 or more (workers, connections, buffer sizes, pids)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, 1 or more")
    return value
