"""Crash-safe repairs of what the analysis found; every BAT change is journaled."""

from __future__ import annotations

import numpy as np

from ..aio import blocking
from ..allocate import grow_file
from ..constants import (BAT_OFFSET_SHIFT, BAT_STATE_MASK, LOG_SECTOR_SIZE, MiB,
                         PAYLOAD_BLOCK_NOT_PRESENT, REGION_TABLE_OFFSETS)
from ..image import VHDXImage
from .analysis import _Findings

_STATE_MASK = np.uint64(BAT_STATE_MASK)
_RESERVED_MASK = np.uint64(((1 << BAT_OFFSET_SHIFT) - 1) & ~BAT_STATE_MASK)

_SECTORS_PER_LOG_ENTRY = 64
_COPY_CHUNK = 1 * MiB


def _repair(img: VHDXImage, f: _Findings) -> None:
    file = img.file
    idx, is_bitmap, off, lengths = f.idx, f.is_bitmap, f.start, f.length
    entries = img.bat.entries[idx]
    new = entries.copy()

    # 1. region table copies: rewrite a bad copy from the one open used
    if f.region_copies_bad:
        good = img.region_table.pack()
        for i in f.region_copies_bad:
            file.pwrite(REGION_TABLE_OFFSETS[i], good)
        file.flush()

    # 2. entries nothing could read: NOT_PRESENT
    drop = (f.past_eof | f.in_metadata | f.bad_state) & ~is_bitmap
    new[drop] = np.uint64(PAYLOAD_BLOCK_NOT_PRESENT)
    # 3. stray bitmap entries and reserved bits
    new[f.stray_bitmap] = np.uint64(0)
    keep_bits = ~f.stray_bitmap & ~drop & f.reserved
    new[keep_bits] &= ~_RESERVED_MASK

    # 4. blocks cut short by a truncation: extend the file over them
    cut = f.cut_short & ~drop
    if cut.any():
        need = int((off[cut] + lengths[cut]).max())
        if need > file.getlength():
            file.truncate(need)
            file.flush()

    # 5. overlapping blocks: give each later one its own copy of the data
    for i in np.flatnonzero(f.overlapping & ~drop):
        i = int(i)
        length = int(lengths[i])
        src = int(off[i])
        dst = blocking(grow_file(file, img.block_size))
        pos = 0
        while pos < length:
            n = min(_COPY_CHUNK, length - pos)
            file.pwrite(dst + pos, bytes(file.pread(src + pos, n)))
            pos += n
        file.flush()
        new[i] = np.uint64(dst) | (entries[i] & _STATE_MASK)

    _journal_bat(img, idx, new)


def _journal_bat(img: VHDXImage, idx: np.ndarray, values: np.ndarray) -> None:
    """Set BAT entries ``idx`` to ``values`` through the log, whole sectors at a
    time (one transaction per run of at most 64 sectors); nothing the size of
    the BAT is copied."""
    old = img.bat.entries
    moved = values != old[idx]
    changed, values = idx[moved], values[moved]
    if not len(changed):
        return
    per_sector = LOG_SECTOR_SIZE // 8
    sectors = np.unique(changed // per_sector)
    runs: list[list[int]] = []
    for s in sectors.tolist():
        if runs and s == runs[-1][-1] + 1 and len(runs[-1]) < _SECTORS_PER_LOG_ENTRY:
            runs[-1].append(s)
        else:
            runs.append([s])
    for run in runs:
        first, last = run[0] * per_sector, min((run[-1] + 1) * per_sector, len(old))
        lo, hi = np.searchsorted(changed, [first, last])
        chunk = np.array(old[first:last])
        chunk[changed[lo:hi] - first] = values[lo:hi]
        blocking(_journal_run(img, first, chunk))


async def _journal_run(img: VHDXImage, first: int, chunk: np.ndarray) -> None:
    def publish() -> None:
        img.bat.entries[first:first + len(chunk)] = chunk   # the in-memory BAT follows
    async with img.lock:
        async with img.transaction() as tx:
            tx.write(img.bat_offset + first * 8, chunk.astype("<u8").tobytes())
            tx.on_commit(publish)
