"""Scatter-gather helpers over descriptor chains: a chain is a list of memoryviews into guest
memory (:data:`vsockrpc.vhost.virtqueue.Chain`), and a header or payload may span several."""

from __future__ import annotations

__all__ = ["scatter", "skip", "total", "truncate"]


def scatter(segments: list[memoryview], data: bytes) -> None:
    """Copy ``data`` across ``segments`` in order (what does not fit is dropped)."""
    pos = 0
    for seg in segments:
        if pos >= len(data):
            return
        n = min(len(seg), len(data) - pos)
        seg[:n] = data[pos : pos + n]
        pos += n


def skip(segments: list[memoryview], count: int) -> list[memoryview]:
    """The segments after their first ``count`` bytes."""
    out = []
    for seg in segments:
        if count >= len(seg):
            count -= len(seg)
            continue
        out.append(seg[count:])
        count = 0
    return out


def truncate(bufs: list[memoryview], limit: int) -> list[memoryview]:
    """The first ``limit`` bytes of ``bufs``, without empty segments."""
    out = []
    for whole in bufs:
        if limit <= 0:
            break
        buf = whole[:limit] if len(whole) > limit else whole
        if len(buf):
            out.append(buf)
        limit -= len(buf)
    return out


def total(segments: list[memoryview]) -> int:
    return sum(len(s) for s in segments)
