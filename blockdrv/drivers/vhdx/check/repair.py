"""Crash-safe repairs of what the analysis found; every BAT change is journaled."""

from __future__ import annotations

import sys
from array import array

from ..aio import blocking
from ..allocate import grow_file
from ..constants import (BAT_OFFSET_SHIFT, BAT_STATE_MASK, LOG_SECTOR_SIZE, MiB,
                         PAYLOAD_BLOCK_NOT_PRESENT, REGION_TABLE_OFFSETS)
from ..image import VHDXImage
from .analysis import _Findings
from .entries import is_few

_RESERVED_BITS = ((1 << BAT_OFFSET_SHIFT) - 1) & ~BAT_STATE_MASK

_LITTLE = sys.byteorder == "little"
_SECTORS_PER_LOG_ENTRY = 64
_COPY_CHUNK = 1 * MiB


def _repair(img: VHDXImage, f: _Findings) -> None:
    # 1. region table copies: rewrite a bad copy from the one open used
    if f.region_copies_bad:
        good = img.region_table.pack()
        for i in f.region_copies_bad:
            img.file.pwrite(REGION_TABLE_OFFSETS[i], good)
        img.file.flush()
    (_repair_few if is_few(f.found) else _repair_np)(img, f)


def _repair_few(img: VHDXImage, f: _Findings) -> None:
    """:func:`_repair_np` entry by entry."""
    file = img.file
    idx, is_bitmap, off, lengths = f.idx, f.is_bitmap, f.start, f.length
    entries = [img.bat.raw_at(i) for i in idx]
    new = list(entries)
    cut_end = 0
    copies = []
    for k, value in enumerate(entries):
        # 2. entries nothing could read: NOT_PRESENT
        drop = (f.past_eof[k] or f.in_metadata[k] or f.bad_state[k]) and not is_bitmap[k]
        if drop:
            new[k] = PAYLOAD_BLOCK_NOT_PRESENT
        # 3. stray bitmap entries and reserved bits
        if f.stray_bitmap[k]:
            new[k] = 0
        elif not drop and f.reserved[k]:
            new[k] &= ~_RESERVED_BITS
        if drop:
            continue
        if f.cut_short[k]:
            cut_end = max(cut_end, off[k] + lengths[k])
        if f.overlapping[k]:
            copies.append(k)
    # 4. blocks cut short by a truncation: extend the file over them
    if cut_end > file.getlength():
        file.truncate(cut_end)
        file.flush()
    # 5. overlapping blocks: give each later one its own copy of the data
    for k in copies:
        new[k] = _copy_block(img, off[k], lengths[k]) | (entries[k] & BAT_STATE_MASK)
    changed = [(i, v) for i, v, old in zip(idx, new, entries) if v != old]
    _journal_changes(img, changed)


def _copy_block(img: VHDXImage, src: int, length: int) -> int:
    """A new block holding the ``length`` bytes at ``src``; its file offset."""
    file = img.file
    dst = blocking(grow_file(file, img.block_size))
    pos = 0
    while pos < length:
        n = min(_COPY_CHUNK, length - pos)
        file.pwrite(dst + pos, bytes(file.pread(src + pos, n)))
        pos += n
    file.flush()
    return dst


def _repair_np(img: VHDXImage, f: _Findings) -> None:
    import numpy as np
    file = img.file
    idx, is_bitmap, off, lengths = f.idx, f.is_bitmap, f.start, f.length
    entries = img.bat.entries[idx]
    new = entries.copy()

    # 2. entries nothing could read: NOT_PRESENT
    drop = (f.past_eof | f.in_metadata | f.bad_state) & ~is_bitmap
    new[drop] = np.uint64(PAYLOAD_BLOCK_NOT_PRESENT)
    # 3. stray bitmap entries and reserved bits
    new[f.stray_bitmap] = np.uint64(0)
    keep_bits = ~f.stray_bitmap & ~drop & f.reserved
    new[keep_bits] &= ~np.uint64(_RESERVED_BITS)

    # 4. blocks cut short by a truncation: extend the file over them
    cut = f.cut_short & ~drop
    if cut.any():
        need = int((off[cut] + lengths[cut]).max())
        if need > file.getlength():
            file.truncate(need)
            file.flush()

    # 5. overlapping blocks: give each later one its own copy of the data
    for i in np.flatnonzero(f.overlapping & ~drop).tolist():
        dst = _copy_block(img, int(off[i]), int(lengths[i]))
        new[i] = np.uint64(dst) | (entries[i] & np.uint64(BAT_STATE_MASK))

    moved = new != entries
    _journal_changes(img, list(zip(idx[moved].tolist(), new[moved].tolist())))


def _journal_changes(img: VHDXImage, changed: list[tuple[int, int]]) -> None:
    """Set BAT entries ((index, value), in index order) through the log, whole
    sectors at a time (one transaction per run of at most 64 sectors); nothing
    the size of the BAT is copied."""
    if not changed:
        return
    bat = img.bat
    per_sector = LOG_SECTOR_SIZE // 8
    runs: list[list[int]] = []              # [first sector, last sector, changes...]
    for i, v in changed:
        s = i // per_sector
        if runs and s <= runs[-1][1] + 1 and s - runs[-1][0] < _SECTORS_PER_LOG_ENTRY:
            runs[-1][1] = s
            runs[-1].append((i, v))
        else:
            runs.append([s, s, (i, v)])
    for s0, s1, *moves in runs:
        first, last = s0 * per_sector, min((s1 + 1) * per_sector, bat.total_entries)
        chunk = array("Q")
        if bat._q is not None:                  # a native little-endian view
            chunk.frombytes(bat._q[first:last].tobytes())
        else:
            chunk.fromlist(bat.entries[first:last].tolist())
        for i, v in moves:
            chunk[i - first] = v
        blocking(_journal_run(img, first, chunk))


async def _journal_run(img: VHDXImage, first: int, chunk: array) -> None:
    data = chunk.tobytes() if _LITTLE else _swapped(chunk)

    def publish() -> None:                  # the in-memory BAT follows
        img.bat.store(first, chunk)
    async with img.lock:
        async with img.transaction() as tx:
            tx.write(img.bat_offset + first * 8, data)
            tx.on_commit(publish)


def _swapped(chunk: array) -> bytes:
    other = array("Q", chunk)
    other.byteswap()
    return other.tobytes()
