"""The one validator of BAT entries (spec 2.5) and sector bitmap entries
(2.5.1.2), for open and for ``check`` alike.

The rules are written once, as predicates over a block's file extent that
work on Python ints and on numpy arrays (``&``/``|`` of comparisons):

* :func:`in_metadata` -- the extent overlaps the header section, the log or
  a region (reads would return metadata as guest data);
* :func:`past_end` -- the extent ends past the end of the file (the image
  was truncated: reads would return zeros for data the BAT says is there).

Both take (start, length) and never add them: an offset near 2**63 must not
wrap around in numpy's int64 arithmetic.

:func:`refuse_at_open` raises on the first present entry either rule finds,
and on the first bad sector bitmap entry (qemu refuses the same images).  It
stays cheap on any table: the entries that differ from the table's
background (:meth:`.bat.Bat.background_scan`, no numpy) are judged one by
one; any other table in chunks of a few MiB.  :func:`scan` evaluates the
same rules, and what only ``check`` looks at (states, reserved bits,
overlapping blocks, sector bitmap entries of images without parent), on
every entry worth a look, as :class:`Findings` (``check`` adds qemu's
counting and the messages, :mod:`.check.analysis`).

Region tables are validated by :meth:`.region.RegionTable.validate` at open
(overlaps refused, or collected for a read-only ``check``).

Block extents: a payload block is ``block_size`` long except the last,
which ends with the virtual disk; a sector bitmap block is 1 MiB.  File
offsets are the 44-bit BAT field in bytes, saturated to int64.
"""

from __future__ import annotations

from blockdrv._startup import dataclass

from blockdrv.errors import CorruptImageError

from .bat import bitmap_index
from .constants import (BAT_OFFSET_MASK, BAT_OFFSET_SHIFT, BAT_STATE_MASK, HEADER_SECTION_SIZE,
                        PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                        SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT, SECTOR_BITMAP_BLOCK_SIZE)

_INT64_MAX = (1 << 63) - 1
_RESERVED = ((1 << BAT_OFFSET_SHIFT) - 1) & ~BAT_STATE_MASK
VALID_STATES = (0, 1, 2, 3, 5, 6, 7)        # 5: pre-1.0 UNMAPPED, still accepted
_FEW = 4096                                  # differing entries judged one by one


# -- the rules -----------------------------------------------------------------

def in_metadata(start, length, spans):
    """Extent ``[start, start + length)`` overlaps the header section or one of
    ``spans`` ((start, end) of the log and every region)."""
    hit = start < HEADER_SECTION_SIZE
    for s, e in spans:
        hit = hit | ((start < e) & (start > s - length))
    return hit


def past_end(start, length, file_length):
    """Extent ``[start, start + length)`` does not end inside the file."""
    return (start >= file_length) | (start > file_length - length)


def _spans(layout) -> list[tuple[int, int]]:
    """The log and the regions, as (start, end): what payload must not overlap."""
    return layout.structure_spans()[1:]


# -- open --------------------------------------------------------------------------

def refuse_at_open(layout, file_length: int) -> None:
    """Raise on the first finding that makes the image unsafe to open."""
    bat = layout.bat
    if bat.differencing:
        problems = bitmap_problems(layout, file_length, partial=False)
        if problems:
            raise CorruptImageError(problems[0])
    spans = _spans(layout)
    scan = bat.background_scan(limit=_FEW)
    if scan is not None:
        hit = _first_fatal_few(bat, scan[1], file_length, spans)
    else:
        hit = _first_fatal_chunked(bat, file_length, spans)
    if hit is None:
        return
    block, what = hit
    if what == "metadata":
        raise CorruptImageError(f"VHDX BAT entry for block {block} points into VHDX metadata")
    raise CorruptImageError(
        f"VHDX BAT entry for block {block} points after the end of the file "
        "(the image has probably been truncated)")


def _first_fatal_few(bat, diff, file_length: int, spans):
    """The rules over (BAT index, raw entry) pairs, in index order."""
    step = bat.chunk_ratio + 1
    bsize, vsize = bat.block_size, bat.virtual_size
    for i, value in diff:
        if i % step == step - 1 or value & BAT_STATE_MASK < PAYLOAD_BLOCK_FULLY_PRESENT:
            continue
        block = i - i // step
        start = min(value & BAT_OFFSET_MASK, _INT64_MAX)
        length = min(bsize, vsize - block * bsize)
        if in_metadata(start, length, spans):
            return block, "metadata"
        if past_end(start, length, file_length):
            return block, "eof"
    return None


def _first_fatal_chunked(bat, file_length: int, spans):
    """The rules over the whole table, a chunk at a time (bounded temporaries)."""
    import numpy as np
    step = bat.chunk_ratio + 1
    for lo, st in bat._state_chunks():
        idx = np.flatnonzero(st >= PAYLOAD_BLOCK_FULLY_PRESENT) + lo      # 6 or 7
        idx = idx[idx % step != step - 1]                                  # payload only
        if not len(idx):
            continue
        block = idx - idx // step
        start = _offsets(bat.entries[idx])
        length = _lengths(bat, block)
        meta = in_metadata(start, length, spans)
        eof = past_end(start, length, file_length)
        hit = np.flatnonzero(meta | eof)
        if len(hit):
            first = hit[0]
            return int(block[first]), "metadata" if meta[first] else "eof"
    return None


# -- check ---------------------------------------------------------------------------

@dataclass
class Findings:
    """Every entry worth a look (``idx``: BAT indices, in order) and, parallel
    to it, its geometry and one boolean array per problem."""

    idx: object
    block: object                 # payload block number (meaningless for bitmap entries)
    is_bitmap: object
    state: object
    start: object                 # file offset, int64 (saturated)
    length: object                # bytes of the block inside the disk (bitmap: 1 MiB)
    overflow: object              # offset field beyond int64 once the block is added
    past_eof: object              # present, starts at or past the end of file
    cut_short: object             # present, starts inside the file, ends past it
    in_metadata: object           # present payload over the header, log or a region
    overlapping: object           # present payload overlapping an earlier block
    partial: object               # PARTIALLY_PRESENT in an image without parent
    bad_state: object             # payload entry in no defined state
    reserved: object              # reserved bits 3..19 set
    stray_bitmap: object          # sector bitmap entry in use without parent


def scan(bat, file_length: int, spans) -> Findings:
    """All findings of ``bat`` in a file of ``file_length`` bytes whose log
    and regions are ``spans`` ((start, end) pairs)."""
    import numpy as np
    all_entries = bat.entries
    ratio = bat.chunk_ratio
    # A payload entry 0..3 (absent, no offset, no reserved bit) and a zero
    # sector bitmap entry are always fine; a sparse disk is almost only those.
    idx = np.flatnonzero(all_entries > np.uint64(3))
    bitmap_idx = np.arange(ratio, len(all_entries), ratio + 1, dtype=np.int64)
    stray = bitmap_idx[all_entries[bitmap_idx] != 0]
    if len(stray):
        idx = np.union1d(idx, stray)
    idx = idx.astype(np.int64)
    entries = all_entries[idx]
    is_bitmap = (idx % (ratio + 1)) == ratio
    payload = ~is_bitmap
    block = idx - idx // (ratio + 1)
    state = (entries & np.uint64(BAT_STATE_MASK)).astype(np.uint8)
    start = _offsets(entries)
    length = np.where(payload, _lengths(bat, block), SECTOR_BITMAP_BLOCK_SIZE)
    present = payload & ((state == PAYLOAD_BLOCK_FULLY_PRESENT)
                         | (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT))
    overflow = present & ((entries & np.uint64(BAT_OFFSET_MASK))
                          > np.uint64(_INT64_MAX - bat.block_size))
    past_eof = present & (overflow | (start >= file_length))
    cut_short = present & ~past_eof & past_end(start, length, file_length)
    meta = present & in_metadata(start, length, spans)
    diff = bat.differencing
    return Findings(
        idx, block, is_bitmap, state, start, length, overflow, past_eof, cut_short, meta,
        overlapping=_overlaps(present & ~meta & ~past_eof, start, length),
        partial=payload & (state == PAYLOAD_BLOCK_PARTIALLY_PRESENT) & (not diff),
        bad_state=payload & ~np.isin(state, VALID_STATES),
        reserved=(entries & np.uint64(_RESERVED)) != 0,
        stray_bitmap=is_bitmap & (state != 0) & (not diff))


def scan_layout(layout, file_length: int) -> Findings:
    return scan(layout.bat, file_length, _spans(layout))


def _overlaps(mask, start, length):
    """Entries whose extent overlaps an earlier-starting one; for equal starts
    the lower BAT index (entries are in BAT order) is kept."""
    import numpy as np
    out = np.zeros(len(mask), bool)
    ids = np.flatnonzero(mask)
    if len(ids) < 2:
        return out
    starts = start[ids]
    ends = starts + length[ids]
    order = np.lexsort((ids, starts))
    s, e = starts[order], ends[order]
    prev_end = np.maximum.accumulate(e)
    hit = np.zeros(len(ids), bool)
    hit[1:] = s[1:] < prev_end[:-1]
    out[ids[order][hit]] = True
    return out


def _offsets(entries):
    """File offsets as int64; an offset that overflows int64 saturates."""
    import numpy as np
    return np.minimum(entries & np.uint64(BAT_OFFSET_MASK),
                      np.uint64(_INT64_MAX)).astype(np.int64)


def _lengths(bat, block):
    """Bytes of each payload block inside the virtual disk (the last may be short)."""
    import numpy as np
    return np.clip(bat.virtual_size - block * bat.block_size, 0, bat.block_size)


# -- sector bitmap entries -------------------------------------------------------------

def bitmap_problems(layout, file_length: int, partial: bool = True) -> list[str]:
    """Sector bitmap entries of a differencing image that violate 2.5.1.2: a
    bitmap block in the header section, in a region, or past the end of the
    file; with ``partial``, a PARTIALLY_PRESENT block whose chunk has no
    bitmap block."""
    bat = layout.bat
    if not bat.differencing:
        return []
    ratio = bat.chunk_ratio
    spans = _spans(layout)
    out: list[str] = []
    absent_chunks = []
    for chunk in range(-(-bat.data_blocks // ratio)):
        idx = bitmap_index(chunk, ratio)
        raw = bat.raw_at(idx)
        state, off = raw & BAT_STATE_MASK, raw & BAT_OFFSET_MASK
        if state == SB_BLOCK_PRESENT:
            if off < HEADER_SECTION_SIZE:
                out.append(f"VHDX BAT entry {idx} (sector bitmap) points into the header")
            elif in_metadata(off, SECTOR_BITMAP_BLOCK_SIZE, spans):
                out.append(f"VHDX BAT entry {idx} (sector bitmap) points into the header, "
                           "log, BAT or metadata")
            elif past_end(off, SECTOR_BITMAP_BLOCK_SIZE, file_length):
                out.append(f"VHDX BAT entry {idx} (sector bitmap) points after the end of "
                           f"file ({file_length})")
        elif state == SB_BLOCK_NOT_PRESENT:
            absent_chunks.append(chunk)
    if partial and absent_chunks:
        import numpy as np
        pp = np.flatnonzero(bat.states() == PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        if len(pp):
            hit = np.isin(pp // ratio, np.array(absent_chunks))
            for block in pp[hit][:50].tolist():
                out.append(f"VHDX block {block} is PARTIALLY_PRESENT but its chunk has "
                           f"no sector bitmap block (BAT entry "
                           f"{bitmap_index(block // ratio, ratio)})")
    return out


__all__ = ["refuse_at_open", "scan", "scan_layout", "Findings", "bitmap_problems",
           "in_metadata", "past_end", "VALID_STATES"]
