"""Offline compaction of a dynamic or differencing VHDX (what Hyper-V's
Optimize-VHD does), in three passes over an image opened read-write:

1. **Zero blocks.**  Every FULLY_PRESENT payload block whose guest bytes
   are all zeros (host holes are skipped through the file's block status,
   the rest read in 4 MiB pieces) becomes ``PAYLOAD_BLOCK_ZERO`` -- the one
   state whose reads MUST return zeros (spec 2.5.1.1), in a child too: it
   reads zeros whatever the parent holds, as the block did.  NOT_PRESENT is
   never used (a child's parent would show through; a dynamic image's
   NOT_PRESENT reads "arbitrary data").  PARTIALLY_PRESENT blocks are left
   as they are.  Absent entries that still carry a FileOffsetMB (UNMAPPED
   and UNDEFINED may, spec option 1) get it cleared, so that no reader can
   find another block's bytes there once the space is reused.  Sector
   bitmap blocks of chunks without PARTIALLY_PRESENT blocks are freed
   (entry NOT_PRESENT: every sector of such a chunk is decided by its
   payload entry alone).
2. **Moves.**  The used spans (:mod:`.space`) and the free holes between
   them are computed; the highest block (payload or sector bitmap) moves to
   the lowest hole below it that fits, then the next highest, and so on.
   Holes are only ever below the block that takes them, so a block's old
   place is never a destination in the same run.  Each batch: blocks copied
   (host holes as zero writes), then one transaction pointing their entries
   at the copies -- the transaction flushes the file before its log entry,
   so a crash leaves every entry on either its old or its new copy.
3. **Truncate** to the end of the last used span, once every entry is
   durable (only unreferenced space goes); the holes left below are punched.

Guest data never changes, nor does the DataWriteGuid (a compacted parent's
children stay valid).  Fixed images are refused: LeaveBlockAllocated forbids
shrinking them (convert to a dynamic image instead).  The read-write open
replays a pending log first, as every read-write open does; a dry run
(read-only) refuses one, since it would measure the file without it.
"""

from __future__ import annotations

from blockdrv._startup import dataclass, field
from typing import Callable

from blockdrv.common import BLOCK_ZERO
from blockdrv.errors import ReadOnlyError, UnsupportedError
from blockdrv.iov import buffer_is_zero

from .bat import encode_entry
from .constants import (ABSENT_STATES, BAT_OFFSET_MASK, BAT_STATE_MASK, MiB,
                        PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                        PAYLOAD_BLOCK_ZERO, SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT)
from .discard import BATCH
from .space import Span, holes, used_end, used_spans

_CHUNK = 4 * MiB                 # zero scan and copy unit
_MOVE_BATCH = 64 * MiB           # bytes copied per transaction


@dataclass
class CompactReport:
    dry_run: bool
    length_before: int
    length_after: int            # projected by a dry run
    zeroed_blocks: int = 0       # FULLY_PRESENT blocks of zeros -> ZERO
    cleared_offsets: int = 0     # absent entries whose stale offset was cleared
    freed_bitmaps: int = 0       # sector bitmap blocks no longer needed
    moved_blocks: int = 0
    moves: list = field(default_factory=list, repr=False)

    @property
    def freed(self) -> int:
        return max(self.length_before - self.length_after, 0)


async def co_compact(img, *, dry_run: bool = False,
                     progress: Callable[[float], object] | None = None) -> CompactReport:
    if img.fixed:
        raise UnsupportedError("Cannot compact a fixed VHDX image: its blocks stay "
                               "allocated (LeaveBlockAllocated); convert it to a dynamic "
                               "image instead")
    if img.overlay is not None:
        raise UnsupportedError("The image has a pending log; compact without --dry-run "
                               "replays it first")
    if img.read_only and not dry_run:
        raise ReadOnlyError("Cannot compact a read-only image")
    report = progress or (lambda f: None)
    file, bat = img.file, img.bat
    await file.co_flush()            # the zero scan asks the file's block status
    report_ = CompactReport(dry_run, file.getlength(), file.getlength())

    # 1. zero blocks, stale offsets, unneeded sector bitmap blocks
    entries: dict[int, int] = {}                # BAT index -> new raw entry
    present = [b for b in range(bat.data_blocks)
               if bat.raw(b) & BAT_STATE_MASK == PAYLOAD_BLOCK_FULLY_PRESENT]
    total = len(present) or 1
    for i, block in enumerate(present):
        raw = bat.raw(block)
        n = min(img.block_size, img.virtual_size - block * img.block_size)
        if await _all_zero(file, raw & BAT_OFFSET_MASK, n):
            entries[bat.index(block)] = encode_entry(PAYLOAD_BLOCK_ZERO)
            report_.zeroed_blocks += 1
        report(0.8 * (i + 1) / total)
    for block in range(bat.data_blocks):
        raw = bat.raw(block)
        if raw & BAT_STATE_MASK in ABSENT_STATES and raw & BAT_OFFSET_MASK:
            entries[bat.index(block)] = raw & BAT_STATE_MASK
            report_.cleared_offsets += 1
    if img.differencing:
        for index in _unneeded_bitmaps(img, entries):
            entries[index] = SB_BLOCK_NOT_PRESENT
            report_.freed_bitmaps += 1

    # 2. the moves, planned over the spans that remain
    gone = {i for i, v in entries.items()
            if v & BAT_STATE_MASK not in (PAYLOAD_BLOCK_FULLY_PRESENT,
                                          PAYLOAD_BLOCK_PARTIALLY_PRESENT)
            or _is_bitmap(bat, i)}
    spans = [s for s in used_spans(img) if s.index not in gone]
    moves, new_end = plan_moves(spans, file.getlength())
    report_.moves = moves
    report_.moved_blocks = len(moves)
    report_.length_after = min(new_end, report_.length_before)
    if dry_run:
        report(1.0)
        return report_

    async with img.lock:
        # the holes are about to be filled: the session's free list (see
        # .discard) is gathered again when next needed
        img.free.clear()
        img.free_scanned = False
        items = sorted(entries.items())
        for k in range(0, len(items), BATCH):
            async with img.transaction() as tx:
                for index, value in items[k:k + BATCH]:
                    tx.set_bat(index, value)
        if img.differencing:
            img.bitmaps._cache.clear()          # freed bitmap blocks: read afresh
        await _move(img, moves, report)
        await file.co_flush()
        if new_end < file.getlength():
            await file.co_truncate(new_end, exact=True)
        for a, b in holes(used_spans(img), new_end):
            try:
                await file.co_pdiscard(a, b - a)
            except Exception:                   # best effort: holes stay as data
                break
        await file.co_flush()
    report_.length_after = file.getlength()
    report(1.0)
    return report_


def _is_bitmap(bat, index: int) -> bool:
    step = bat.chunk_ratio + 1
    return index % step == step - 1


def _unneeded_bitmaps(img, entries: dict[int, int]) -> list[int]:
    """BAT indices of present sector bitmap blocks whose chunk has no
    PARTIALLY_PRESENT payload block left."""
    bat = img.bat
    ratio = bat.chunk_ratio
    out = []
    for chunk in range(-(-bat.data_blocks // ratio)):
        index = chunk * (ratio + 1) + ratio
        if index >= bat.total_entries:
            break
        if bat.raw_at(index) & BAT_STATE_MASK != SB_BLOCK_PRESENT:
            continue
        first = chunk * ratio
        if any(entries.get(bat.index(b), bat.raw(b)) & BAT_STATE_MASK
               == PAYLOAD_BLOCK_PARTIALLY_PRESENT
               for b in range(first, min(first + ratio, bat.data_blocks))):
            continue
        out.append(index)
    return out


async def _all_zero(file, host: int, n: int) -> bool:
    length = file.getlength()
    pos = 0
    while pos < n:
        at = host + pos
        if at >= length:
            return True                          # past the end: zeros
        want = min(_CHUNK, n - pos, length - at)
        st = await file.co_block_status(at, want)
        step = max(min(st.pnum, want), 1)
        if not st.flags & BLOCK_ZERO:
            if not buffer_is_zero(await file.co_pread(at, step)):
                return False
        pos += step
    return True


def plan_moves(spans: list[Span], length: int) -> tuple[list[tuple[Span, int]], int]:
    """``([(span, destination), ...], new end)``: the highest movable span
    first, each to the lowest hole below it that fits."""
    free = [list(h) for h in holes(spans, length)]
    moves = []
    stay = [s for s in spans if s.index < 0]
    for s in sorted((s for s in spans if s.index >= 0), key=lambda s: -s.start):
        size = s.end - s.start
        dest = None
        for h in free:
            if h[0] >= s.start:
                break
            if h[1] - h[0] >= size:
                dest = h[0]
                h[0] += size
                break
        if dest is None:
            stay.append(s)
        else:
            moves.append((s, dest))
            stay.append(Span(dest, dest + size, s.index))
        free = [h for h in free if h[1] > h[0]]
    return moves, used_end(stay)


async def _move(img, moves, report) -> None:
    """Lock held: copy and repoint, one transaction per batch."""
    file, bat = img.file, img.bat
    done = 0
    total = len(moves) or 1
    k = 0
    while k < len(moves):
        batch, size = [], 0
        while k < len(moves) and (not batch or size < _MOVE_BATCH):
            batch.append(moves[k])
            size += moves[k][0].end - moves[k][0].start
            k += 1
        for span, dest in batch:
            await _copy(file, span.start, dest, span.end - span.start)
        async with img.transaction() as tx:
            for span, dest in batch:
                raw = bat.raw_at(span.index)
                tx.set_bat(span.index, dest | (raw & BAT_STATE_MASK))
        done += len(batch)
        report(0.8 + 0.2 * done / total)


async def _copy(file, src: int, dst: int, n: int) -> None:
    length = file.getlength()
    pos = 0
    while pos < n:
        want = min(_CHUNK, n - pos)
        if src + pos >= length:
            await file.co_pwrite_zeroes(dst + pos, n - pos)
            return
        want = min(want, length - src - pos)
        st = await file.co_block_status(src + pos, want)
        step = max(min(st.pnum, want), 1)
        if st.flags & BLOCK_ZERO:
            await file.co_pwrite_zeroes(dst + pos, step)
        else:
            await file.co_pwrite(dst + pos, await file.co_pread(src + pos, step))
        pos += step


def compact(img, *, dry_run: bool = False, progress=None) -> CompactReport:
    """Synchronous form (no event loop: nothing suspends on a local file)."""
    from .aio import blocking
    return blocking(co_compact(img, dry_run=dry_run, progress=progress))


__all__ = ["CompactReport", "co_compact", "compact", "plan_moves"]
