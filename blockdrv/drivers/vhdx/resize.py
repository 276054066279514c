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
from .transaction import sector_diff
from .log.replay import co_write_zeros

def _absent_state(img) -> int:
    """The state this image gives unallocated blocks."""
    counts = img.bat.count_states()
    zero = counts.get(PAYLOAD_BLOCK_ZERO, 0)
    return PAYLOAD_BLOCK_ZERO if zero and zero >= counts.get(PAYLOAD_BLOCK_NOT_PRESENT, 0) \
        else PAYLOAD_BLOCK_NOT_PRESENT


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
    await _Resize(img, new_size).run()


class _Resize:
    """One resize, in the steps of the module docstring."""

    def __init__(self, img, new_size: int) -> None:
        self.img, self.file, self.new_size = img, img.file, new_size
        self.bsize, self.lss = img.block_size, img.logical_sector_size
        self.old_size = img.virtual_size
        self.old_bat = img.bat
        self.old_total = self.old_bat.total_entries
        self.new_total = total_entries(new_size, self.bsize, self.lss)
        self.old_blocks = self.old_bat.data_blocks
        self.new_blocks = -(-new_size // self.bsize)
        self.grow = new_size > self.old_size
        self.bat_rt = img.region_table.bat
        self.flen = self.file.getlength()
        self.payload_base = None           # a fixed image's new blocks start here
        self.tail_fix = None               # (short last block offset, zero from)
        self.bat_updates: list = []
        self.zeros: list = []
        self.rt_updates: list = []
        self.new_rt = None                 # the region table after a relocation
        self.new_bat_offset, self.new_bat_length = self.bat_rt.file_offset, self.bat_rt.length

    async def run(self) -> None:
        img = self.img
        self._plan_table()
        meta_updates = await self._size_item()
        if not await self._bat_in_place(len(meta_updates)):
            await self._relocate()
        await self._unpublished_writes()
        async with img.transaction() as tx:
            tx.write_sectors(self.bat_updates + self.rt_updates + meta_updates)
            tx.zero(self.zeros)
            tx.on_commit(self._publish)
        # then give back a freed tail
        if not self.grow and self.new_blocks < self.old_blocks:
            await _trim_tail(img, self.old_bat, self.new_blocks, self.old_blocks)

    def _plan_table(self) -> None:
        """1. The new table in memory."""
        bsize, old_bat, old_total, new_total = (self.bsize, self.old_bat, self.old_total,
                                                self.new_total)
        keep = min(old_total, new_total)
        self.new_buf = new_buf = bytearray(new_total * 8)
        new_buf[:keep * 8] = old_bat.buf[:keep * 8]
        if self.grow:
            if self.old_size % bsize and self.old_blocks:
                self._plan_tail_fix()
            if new_total > old_total:
                state = _absent_state(self.img)
                if self.img.fixed:
                    state = PAYLOAD_BLOCK_FULLY_PRESENT
                    self.payload_base = round_up(self.flen, ALIGNMENT)
                # payload entries in ``state`` (with consecutive offsets from
                # ``payload_base`` for a fixed image), bitmap entries 0
                new_buf[old_total * 8:] = entry_run(
                    old_total, new_total, chunk_ratio(bsize, self.lss), state,
                    self.payload_base, self.old_blocks, bsize).tobytes()
        self.payload_end = self.flen if self.payload_base is None else \
            self.payload_base + (self.new_blocks - self.old_blocks) * bsize

    def _plan_tail_fix(self) -> None:
        """Growing past a short last block that is present: it becomes (more)
        reachable, so it must be whole and read zeros past the old end."""
        bsize, last = self.bsize, self.old_blocks - 1
        state, off = self.old_bat.get(last)
        if state != PAYLOAD_BLOCK_FULLY_PRESENT:
            return
        starts, ends = _present_spans(self.old_bat, bsize, skip=last)
        clash = bool(np.any((starts < off + bsize) & (ends > off))) or any(
            s < off + bsize and e > off for s, e in self.img.structure_spans())
        if clash:
            raise UnsupportedError(
                "Cannot grow: the image's last block is short and followed by other data")
        self.tail_fix = (off, self.old_size - last * bsize)
        self.flen = max(self.flen, off + bsize)

    async def _size_item(self) -> list:
        """The sector(s) of the VirtualDiskSize metadata item, updated."""
        meta = self.img.region_table.metadata
        item = next(e for e in self.img.layout.metadata_table.entries
                    if e.item_id == VIRTUAL_DISK_SIZE_GUID and not e.is_user)
        return await co_merge_sectors(self.file, meta.file_offset + item.offset,
                                      self.new_size.to_bytes(8, "little"))

    async def _bat_in_place(self, meta_sectors: int) -> bool:
        """The changed sectors of the BAT region; False when the table does not
        fit its region, or the entry would not fit the log (relocate then)."""
        bat_rt, old_total, new_total = self.bat_rt, self.old_total, self.new_total
        if new_total * 8 > bat_rt.length:
            return False
        lo, hi = min(old_total, new_total) * 8, max(old_total, new_total) * 8
        first, end = lo - lo % SECTOR, min(round_up(hi, SECTOR), bat_rt.length)
        updates: list = []
        zeros: list = []
        if end > first:
            cur = bytes(await self.file.co_pread(bat_rt.file_offset + first, end - first))
            want = bytearray(cur)
            top = min(end, new_total * 8)
            if top > first:
                want[:top - first] = self.new_buf[first:top]
            if not self.grow:
                want[new_total * 8 - first:hi - first] = bytes(hi - new_total * 8)
            updates, zeros = sector_diff(bat_rt.file_offset + first, cur, bytes(want))
        if not self.img.log_writer.entry_fits(len(updates) + meta_sectors,
                                              len(updates) + meta_sectors + len(zeros)):
            return False
        self.bat_updates, self.zeros = updates, zeros
        return True

    async def _relocate(self) -> None:
        """A new BAT region at the end of the file: both region tables change."""
        self.new_bat_offset = round_up(max(self.payload_end, self.flen), ALIGNMENT)
        self.new_bat_length = region_length(self.new_total)
        if self.new_bat_length >= 1 << 32:
            raise UnsupportedError("VHDX BAT region would exceed 4 GiB")
        self.new_rt = new_rt = _copy_table(self.img.region_table)
        e = new_rt.bat
        e.file_offset, e.length = self.new_bat_offset, self.new_bat_length
        packed = new_rt.pack()
        for rt_off in REGION_TABLE_OFFSETS:
            cur = bytes(await self.file.co_pread(rt_off, len(packed)))
            upd, zer = sector_diff(rt_off, cur, packed)
            self.rt_updates += upd
            self.zeros += zer

    async def _unpublished_writes(self) -> None:
        """2. Writes invisible to the old image (a crash leaves space unused)."""
        file, bsize = self.file, self.bsize
        if self.tail_fix is not None:
            off, zero_from = self.tail_fix
            if file.getlength() < off + bsize:
                await file.co_truncate(off + bsize)
            await co_write_zeros(file, off + zero_from, off + bsize)
        if self.payload_base is not None and file.getlength() < self.payload_end:
            await file.co_truncate(self.payload_end)
        if self.new_rt is not None:
            end = self.new_bat_offset + self.new_bat_length
            if file.getlength() < end:
                await file.co_truncate(end)
            await file.co_pwrite(self.new_bat_offset, bytes(self.new_buf))

    def _publish(self) -> None:
        """4. In memory, once the log entry is durable."""
        img = self.img
        img.params.virtual_size = self.new_size
        img.set_bat(Bat(self.new_buf, self.new_size, self.bsize, self.lss))
        if self.new_rt is not None:
            old = (self.bat_rt.file_offset, self.bat_rt.length)
            layout = img.layout
            layout.region_table = self.new_rt
            layout.regions = [r if r != old else (self.new_bat_offset, self.new_bat_length)
                              for r in layout.regions]


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
