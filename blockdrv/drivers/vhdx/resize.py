"""Resizing a VHDX image (``bdrv_co_truncate``), crash-safe through the log.

qemu-img 7.2 cannot resize VHDX; Hyper-V can.  Spec 2.3: "The log MUST be
used to perform updates to all metadata except the header" -- and 2.2.3:
"Updates to the region table structures must be made through the log".  So
every change of a live structure here is part of ONE log entry, which makes
the resize atomic: after a power cut the image opens with its old size or
its new size, never a mix.

Algorithm (under ``img.lock``; nothing moves, existing blocks stay put):

1. Plan.  ``total_entries`` of the new size gives the new BAT length.
   New payload entries take the image's convention for an unallocated block
   (ZERO when the image uses ZERO -- qemu's ``block_state_zero=on`` default
   -- else NOT_PRESENT); a *fixed* image instead gets its new blocks
   FULLY_PRESENT, allocated in one piece at the 1 MiB-aligned end of the
   file (as a fixed image must).  Sector bitmap entries stay 0.  Shrinking
   drops the entries past the new end: their on-disk entries become 0 and
   their payload blocks become unreferenced space.
2. Unpublished writes, before the log entry (all invisible to the old
   image, so a crash here leaves at worst unreferenced space -- a leak):
   * growing past a *short* last block (the virtual size ended inside a
     present block): the block is extended to its full length if the file
     ends inside it, and its bytes past the old end are zeroed, so a
     shrink-then-grow never resurrects old data;
   * a fixed image's new blocks: the file is extended over them;
   * BAT relocation (below): the whole new BAT is written to its new region.
3. One transaction (:mod:`.transaction`, one log entry) carrying
   * the metadata sector(s) holding the VirtualDiskSize item, and
   * either the BAT sectors that change (data descriptors; whole sectors
     that become zero as zero descriptors), when the new table fits the
     current BAT region and the entry fits the log,
   * or -- BAT relocation, when the table outgrows its region or the entry
     would not fit the log -- the changed sectors of *both* region tables,
     pointing the BAT region at a new 1 MiB-aligned region at the end of the
     file.  The old BAT region becomes unreferenced space.
   The writer flushes, writes the entry, flushes, sets the header LogGuid,
   applies the sectors, flushes and clears the LogGuid.
4. In memory, once the entry is durable: new ``Bat``, params, regions,
   ``bs.total_size``.  A shrink of
   a dynamic image then truncates the file after the last structure still
   referenced (the dropped blocks, when they were at the end).

qemu 7.2 replays log entries that target any 4 KiB-aligned file offset,
the region tables at 192/256 KiB included (verified by
tests/interop/test_vhdx_resize.py: a resize cut after the LogGuid was set is
repaired by ``qemu-img check -r all`` to the new size).

Fixed images: growing allocates FULLY_PRESENT blocks (see 1.); a
``preallocation`` mode other than ``off`` is refused (UnsupportedError).
"""

from __future__ import annotations

import numpy as np

from blockdrv.errors import InvalidArgumentError, UnsupportedError

from .bat import Bat, chunk_ratio, entry_run, region_length, total_entries
from .constants import (ALIGNMENT, MAX_VIRTUAL_SIZE, PAYLOAD_BLOCK_FULLY_PRESENT,
                        PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_ZERO, REGION_TABLE_OFFSETS,
                        VIRTUAL_DISK_SIZE_GUID, round_up)
from .log import SECTOR, co_merge_sectors
from .log.replay import co_write_zeros

_ZERO_SECTOR = bytes(SECTOR)


def _absent_state(img) -> int:
    """The state this image gives unallocated blocks."""
    counts = img.bat.count_states()
    zero = counts.get(PAYLOAD_BLOCK_ZERO, 0)
    return PAYLOAD_BLOCK_ZERO if zero and zero >= counts.get(PAYLOAD_BLOCK_NOT_PRESENT, 0) \
        else PAYLOAD_BLOCK_NOT_PRESENT


def _sector_diff(file, base: int, old: bytes, new: bytes):
    """(data updates, zero ranges) turning the 4 KiB-aligned range at ``base``
    from ``old`` into ``new`` -- changed sectors only; all-zero ones as zero
    ranges (merged)."""
    updates, zeros = [], []
    for pos in range(0, len(new), SECTOR):
        sec = new[pos:pos + SECTOR]
        if sec == old[pos:pos + SECTOR]:
            continue
        off = base + pos
        if sec == _ZERO_SECTOR:
            if zeros and zeros[-1][0] + zeros[-1][1] == off:
                zeros[-1] = (zeros[-1][0], zeros[-1][1] + SECTOR)
            else:
                zeros.append((off, SECTOR))
        else:
            updates.append((off, bytes(sec)))
    return updates, zeros


def _present_spans(bat: Bat, block_size: int, skip: int | None = None):
    offs = bat.offsets()
    states = bat.states()
    blocks = np.flatnonzero(states == PAYLOAD_BLOCK_FULLY_PRESENT)
    if skip is not None:
        blocks = blocks[blocks != skip]
    starts = offs[blocks].astype(np.int64)
    return starts, starts + block_size


async def truncate(bs, size: int, exact: bool = True, prealloc: str = "off") -> None:
    img = bs.opaque
    if prealloc not in ("off", None):
        raise UnsupportedError(f"Unsupported preallocation mode '{prealloc}' for VHDX")
    if size < 0 or size % img.logical_sector_size:
        raise InvalidArgumentError(
            f"VHDX virtual size must be a multiple of {img.logical_sector_size} bytes")
    if size > MAX_VIRTUAL_SIZE:
        raise InvalidArgumentError("VHDX virtual size cannot exceed 64 TiB")
    if img.read_only or img.log_writer is None:
        raise InvalidArgumentError("VHDX image is not open read-write")
    async with img.lock:
        if size == img.virtual_size:
            return
        # a guest-visible change: renew the DataWriteGuid first, as a write does
        await img.headers.co_mark_data_write()
        await _resize(img, size)
        bs.total_size = img.virtual_size


async def _resize(img, new_size: int) -> None:
    file = img.file
    bsize, lss = img.block_size, img.logical_sector_size
    ratio = chunk_ratio(bsize, lss)
    old_size = img.virtual_size
    old_bat = img.bat
    old_total = old_bat.total_entries
    new_total = total_entries(new_size, bsize, lss)
    old_blocks = old_bat.data_blocks
    new_blocks = -(-new_size // bsize)
    grow = new_size > old_size
    bat_rt = img.region_table.bat
    flen = file.getlength()

    # -- 1. the new table in memory ------------------------------------------
    keep = min(old_total, new_total)
    new_buf = bytearray(new_total * 8)
    new_buf[:keep * 8] = old_bat.buf[:keep * 8]
    payload_base = None
    tail_fix = None                 # (block offset, zero from, file end needed)
    if grow:
        if old_size % bsize and old_blocks:
            last = old_blocks - 1
            state, off = old_bat.get(last)
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                # the short last block becomes (more) reachable: it must be
                # whole and read zeros past the old end
                starts, ends = _present_spans(old_bat, bsize, skip=last)
                spans = img.structure_spans()
                clash = bool(np.any((starts < off + bsize) & (ends > off))) or any(
                    s < off + bsize and e > off for s, e in spans)
                if clash:
                    raise UnsupportedError(
                        "Cannot grow: the image's last block is short and followed by "
                        "other data")
                tail_fix = (off, old_size - last * bsize)
                flen = max(flen, off + bsize)
        if new_total > old_total:
            state = _absent_state(img)
            first_new_block = old_blocks
            if img.fixed:
                state = PAYLOAD_BLOCK_FULLY_PRESENT
                payload_base = round_up(flen, ALIGNMENT)
            # payload entries in ``state`` (with consecutive offsets from
            # ``payload_base`` for a fixed image), bitmap entries 0
            new_buf[old_total * 8:] = entry_run(old_total, new_total, ratio, state,
                                                payload_base, first_new_block,
                                                bsize).tobytes()
    payload_end = flen if payload_base is None else \
        payload_base + (new_blocks - old_blocks) * bsize

    # -- metadata: the VirtualDiskSize item ----------------------------------
    meta = img.region_table.metadata
    item = next(e for e in img.layout.metadata_table.entries
                if e.item_id == VIRTUAL_DISK_SIZE_GUID and not e.is_user)
    meta_updates = await co_merge_sectors(file, meta.file_offset + item.offset,
                                          new_size.to_bytes(8, "little"))

    # -- BAT in place, or relocated -------------------------------------------
    relocate = new_total * 8 > bat_rt.length
    bat_updates: list = []
    bat_zeros: list = []
    if not relocate:
        lo, hi = min(old_total, new_total) * 8, max(old_total, new_total) * 8
        first, end = lo - lo % SECTOR, round_up(hi, SECTOR)
        end = min(end, bat_rt.length)
        if end > first:
            cur = bytes(await file.co_pread(bat_rt.file_offset + first, end - first))
            want = bytearray(cur)
            top = min(end, new_total * 8)
            if top > first:
                want[:top - first] = new_buf[first:top]
            if not grow:
                want[new_total * 8 - first:hi - first] = bytes(hi - new_total * 8)
            bat_updates, bat_zeros = _sector_diff(file, bat_rt.file_offset + first, cur,
                                                  bytes(want))
        if not img.log_writer.entry_fits(len(bat_updates) + len(meta_updates),
                                         len(bat_updates) + len(meta_updates)
                                         + len(bat_zeros)):
            relocate = True
            bat_updates, bat_zeros = [], []

    rt_updates: list = []
    new_bat_offset, new_bat_length = bat_rt.file_offset, bat_rt.length
    if relocate:
        new_bat_offset = round_up(max(payload_end, flen), ALIGNMENT)
        new_bat_length = region_length(new_total)
        if new_bat_length >= 1 << 32:
            raise UnsupportedError("VHDX BAT region would exceed 4 GiB")
        new_rt = _copy_table(img.region_table)
        e = new_rt.bat
        e.file_offset, e.length = new_bat_offset, new_bat_length
        packed = new_rt.pack()
        for rt_off in REGION_TABLE_OFFSETS:
            cur = bytes(await file.co_pread(rt_off, len(packed)))
            upd, zer = _sector_diff(file, rt_off, cur, packed)
            rt_updates += upd
            bat_zeros += zer

    # -- 2. unpublished writes --------------------------------------------------
    if tail_fix is not None:
        off, zero_from = tail_fix
        if file.getlength() < off + bsize:
            await file.co_truncate(off + bsize)
        await co_write_zeros(file, off + zero_from, off + bsize)
    if payload_base is not None and file.getlength() < payload_end:
        await file.co_truncate(payload_end)
    if relocate:
        if file.getlength() < new_bat_offset + new_bat_length:
            await file.co_truncate(new_bat_offset + new_bat_length)
        await file.co_pwrite(new_bat_offset, bytes(new_buf))

    # -- 3. one transaction, 4. published in memory once durable ----------------
    def publish() -> None:
        img.params.virtual_size = new_size
        img.set_bat(Bat(new_buf, new_size, bsize, lss))
        if relocate:
            layout = img.layout
            layout.region_table = new_rt
            layout.regions = [r if r != (bat_rt.file_offset, bat_rt.length)
                              else (new_bat_offset, new_bat_length) for r in layout.regions]

    async with img.transaction() as tx:
        tx.write_sectors(bat_updates + rt_updates + meta_updates)
        tx.zero(bat_zeros)
        tx.on_commit(publish)
    # then give back a freed tail
    if not grow and new_blocks < old_blocks:
        await _trim_tail(img, old_bat, new_blocks, old_blocks)


def _copy_table(rt):
    from .region import RegionEntry, RegionTable
    return RegionTable([RegionEntry(e.guid, e.file_offset, e.length, e.required)
                        for e in rt.entries], rt.checksum)


async def _trim_tail(img, old_bat: Bat, new_blocks: int, old_blocks: int) -> None:
    """Truncate the file after the last referenced structure when the dropped
    blocks were at its end.  A fixed image that preallocated dropped blocks
    it never referenced (ZERO-state entries) keeps its length: ``check -r
    leaks`` decides about that space."""
    dropped = old_bat.states()[new_blocks:old_blocks]
    if img.fixed and np.any(dropped != PAYLOAD_BLOCK_FULLY_PRESENT):
        return
    file = img.file
    starts, ends = _present_spans(img.bat, img.block_size)
    end = max([e for _, e in img.structure_spans()]
              + ([int(ends.max())] if len(ends) else []))
    end = round_up(end, ALIGNMENT)
    if end < file.getlength():
        await file.co_truncate(end)
        await file.co_flush()


__all__ = ["truncate"]
