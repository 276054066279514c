"""Which entries ``check`` looks at, and the numpy-free path for few of them.

An ordinary table is a background (:meth:`..bat.Bat.background_scan`) plus
a few entries that differ; ``check`` then judges those few in pure Python
(:func:`scan_few`, the rules of :func:`..validate.scan` entry by entry) and
never imports numpy, which costs more than the rest of the command.  A table
with more entries worth a look goes to the vectorised path (numpy imported
inside the functions that use it).  Both paths give the same findings.
"""

from __future__ import annotations

import os

from blockdrv._startup import field_names

from ..constants import (BAT_OFFSET_MASK, BAT_STATE_MASK, PAYLOAD_BLOCK_FULLY_PRESENT,
                         PAYLOAD_BLOCK_PARTIALLY_PRESENT, SECTOR_BITMAP_BLOCK_SIZE)
from ..validate import _RESERVED, VALID_STATES, Findings, _spans, in_metadata, past_end

# Most entries worth a look (present, invalid, reserved bits, stray bitmap)
# judged in pure Python; more go to numpy.  Measured: `_analyse` +
# `_free_space` (as check_image runs them) of a 128 GiB, 1 MiB-block table
# (131k entries) with N FULLY_PRESENT entries spread evenly (the worst case
# for the background scan: every entry in its own leaf), best of 5, numpy
# already imported, 2 shared cores, ms:
#
#   N                  256    1k     2k     4k     16k     64k
#   pure Python        3.5   11.5   21.3   31.1   106.1   408.6
#   numpy              0.5    0.6    0.7    0.8     2.2     7.1
#
# plus numpy's import for the numpy path: ~40 ms on a quiet machine (bat.py),
# 85-130 ms during this measurement.  Pure Python wins while its cost stays
# under that import: up to ~5k entries at 40 ms (4k: 31 against 41 ms);
# from 16k on numpy pays whatever the import costs.  4096 keeps a margin
# and is the bound open uses (validate._FEW), so a table open judged
# without numpy is checked without numpy.
PY_MAX = 4096

# Tests force one path, in this process and in the commands it starts:
# "python" (any number of entries, when the table has a cheap scan) or "numpy".
FORCE_ENV = "BLOCKDRV_VHDX_CHECK_PATH"

_INT64_MAX = (1 << 63) - 1
_PRESENT = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)


def few_entries(bat, limit: int | None = None) -> list[tuple[int, int]] | None:
    """(BAT index, raw entry) of every entry worth a look -- the entries
    :func:`..validate.scan` selects: a value above 3, or a sector bitmap
    entry that is not 0 -- in index order; None when there are more than
    ``limit`` (default :data:`PY_MAX`) or the table has no cheap scan."""
    force = os.environ.get(FORCE_ENV)
    if force == "numpy":
        return None
    if limit is None:
        limit = 1 << 62 if force == "python" else PY_MAX
    scan = bat.background_scan(limit=limit)
    if scan is None:
        return None
    bg, diff = scan
    if bg > 3:
        return None                 # the background itself is worth a look
    ratio = bat.chunk_ratio
    step = ratio + 1
    out = [(i, v) for i, v in diff if v > 3 or (v and i % step == ratio)]
    # past the payload: the tail of a differencing table's last chunk
    end, total = bat._payload_end(), bat.total_entries
    if end < total and bytes(bat.buf[end * 8:total * 8]).count(0) != (total - end) * 8:
        q = bat._q
        out += [(i, q[i]) for i in range(end, total)
                if q[i] > 3 or (q[i] and i % step == ratio)]
    return out if len(out) <= limit else None


def scan_few(bat, file_length: int, spans, pairs) -> Findings:
    """:func:`..validate.scan` over ``pairs`` ((BAT index, raw entry), in
    index order), with lists where it has arrays."""
    ratio = bat.chunk_ratio
    step = ratio + 1
    bsize, vsize, diff = bat.block_size, bat.virtual_size, bat.differencing
    names = [n for n in field_names(Findings) if n != "overlapping"]
    rows = []                           # one tuple per entry, in the order of names
    for i, v in pairs:
        is_bitmap = i % step == ratio
        block = i - i // step
        state = v & BAT_STATE_MASK
        raw_off = v & BAT_OFFSET_MASK
        start = raw_off if raw_off <= _INT64_MAX else _INT64_MAX
        if is_bitmap:
            length = SECTOR_BITMAP_BLOCK_SIZE
        else:
            length = min(max(vsize - block * bsize, 0), bsize)
        present = not is_bitmap and state in _PRESENT
        if present:
            overflow = raw_off > _INT64_MAX - bsize
            past_eof = overflow or start >= file_length
            cut_short = not past_eof and past_end(start, length, file_length)
            meta = bool(in_metadata(start, length, spans))
        else:
            overflow = past_eof = cut_short = meta = False
        rows.append((i, block, is_bitmap, state, start, length, overflow, past_eof, cut_short,
                     meta,
                     not is_bitmap and state == PAYLOAD_BLOCK_PARTIALLY_PRESENT and not diff,
                     not is_bitmap and state not in VALID_STATES,
                     bool(v & _RESERVED),
                     is_bitmap and state != 0 and not diff))
    cols = {n: list(c) for n, c in zip(names, zip(*rows))} if rows else {n: [] for n in names}
    present = [not b and s in _PRESENT for b, s in zip(cols["is_bitmap"], cols["state"])]
    cols["overlapping"] = _overlaps(
        [p and not m and not e for p, m, e in zip(present, cols["in_metadata"], cols["past_eof"])],
        cols["start"], cols["length"])
    return Findings(**cols)


def _overlaps(mask, start, length) -> list[bool]:
    """As :func:`..validate._overlaps`: entries overlapping an earlier-starting
    one (equal starts: the lower BAT index is kept)."""
    out = [False] * len(mask)
    ids = sorted((start[k], k) for k, m in enumerate(mask) if m)
    prev_end = None
    for s, k in ids:
        if prev_end is not None and s < prev_end:
            out[k] = True
        e = s + length[k]
        prev_end = e if prev_end is None else max(prev_end, e)
    return out


def findings(img, file_length: int, limit: int | None = None) -> Findings:
    """The findings of ``img``'s BAT: lists (pure Python) for few entries
    worth a look, numpy arrays (:func:`..validate.scan_layout`) otherwise."""
    layout = img.layout
    pairs = few_entries(layout.bat, limit)
    if pairs is None:
        from ..validate import scan_layout
        return scan_layout(layout, file_length)
    return scan_few(layout.bat, file_length, _spans(layout), pairs)


def is_few(f: Findings) -> bool:
    return isinstance(f.idx, list)
