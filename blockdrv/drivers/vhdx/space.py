"""Where the file is used, and where it is free (spec 2.1: structures and
free space may intermix anywhere, every object 1 MiB aligned).

Used: the header section, the log and every region (BAT, metadata), each
present payload block (``block_size`` bytes) and each present sector bitmap
block (1 MiB).  Everything else below the end of the file is free: space a
discard or a compaction gave up, or a block a crash left unreferenced.
Reused by :mod:`.discard` (allocations take freed blocks before the file
grows) and :mod:`.compact` (blocks move from the end into holes).
"""

from __future__ import annotations

from typing import NamedTuple

from .constants import (BAT_OFFSET_MASK, BAT_STATE_MASK, MiB, PAYLOAD_BLOCK_FULLY_PRESENT,
                        PAYLOAD_BLOCK_PARTIALLY_PRESENT, SB_BLOCK_PRESENT,
                        SECTOR_BITMAP_BLOCK_SIZE, round_up)


class Span(NamedTuple):
    start: int
    end: int
    index: int          # BAT index; -1 for a structure (header, log, region)


def used_spans(img) -> list[Span]:
    """Every used span, sorted by start."""
    import numpy as np
    bat = img.bat
    spans = [Span(s, e, -1) for s, e in img.structure_spans()]
    n = bat.total_entries
    if n:
        entries = bat.entries
        states = (entries & np.uint64(BAT_STATE_MASK)).astype(np.uint8)
        step = bat.chunk_ratio + 1
        idx = np.arange(n)
        is_bitmap = idx % step == step - 1
        payload = ~is_bitmap & ((states == PAYLOAD_BLOCK_FULLY_PRESENT)
                                | (states == PAYLOAD_BLOCK_PARTIALLY_PRESENT))
        bitmap = is_bitmap & (states == SB_BLOCK_PRESENT)
        offs = entries & np.uint64(BAT_OFFSET_MASK)
        for i in np.flatnonzero(payload).tolist():
            o = int(offs[i])
            spans.append(Span(o, o + img.block_size, i))
        for i in np.flatnonzero(bitmap).tolist():
            o = int(offs[i])
            spans.append(Span(o, o + SECTOR_BITMAP_BLOCK_SIZE, i))
    spans.sort()
    return spans


# qemu and blockdrv leave 4 MiB between the metadata and the first block
# (check's "layout, not free space"): kept as it is.
DATA_GAP = 4 * MiB


def data_start(spans: list[Span]) -> int:
    """Where payload may go: after the structures at the start of the file
    and the gap qemu leaves after them, or lower where a block already is."""
    first = min((s.start for s in spans if s.index >= 0), default=None)
    ends = [s.end for s in spans if s.index < 0 and (first is None or s.start < first)]
    start = round_up(max(ends, default=0), MiB) + DATA_GAP
    return start if first is None else min(start, first)


def holes(spans: list[Span], end: int) -> list[tuple[int, int]]:
    """Free 1 MiB-aligned ``(start, end)`` ranges from :func:`data_start`
    to ``end``."""
    out = []
    at = data_start(spans)
    for s in spans:
        if s.start > at:
            a = round_up(at, MiB)
            b = min(s.start, end) // MiB * MiB
            if b > a:
                out.append((a, b))
        at = max(at, s.end)
    a = round_up(at, MiB)
    b = end // MiB * MiB
    if b > a:
        out.append((a, b))
    return out


def free_blocks(img) -> list[int]:
    """Offsets where a payload block fits in the free space, lowest first."""
    bsize = img.block_size
    out = []
    for a, b in holes(used_spans(img), img.file.getlength()):
        while a + bsize <= b:
            out.append(a)
            a += bsize
    return out


def used_end(spans: list[Span]) -> int:
    return round_up(max((s.end for s in spans), default=0), MiB)


__all__ = ["Span", "used_spans", "holes", "data_start", "DATA_GAP", "free_blocks", "used_end"]
