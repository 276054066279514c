"""Guest I/O of differencing VHDX images (HasParent, spec 2.5.1.1).

Reads, per payload block state:

* FULLY_PRESENT: this file (the sector bitmap is not consulted, as the spec
  requires);
* NOT_PRESENT: the parent, at the same guest offset (zeros past the parent's
  end, or when the image was opened without its backing chain);
* PARTIALLY_PRESENT: sector by sector from the chunk's sector bitmap -- bit 1
  this file, bit 0 the parent -- in coalesced runs; a chunk without bitmap
  block reads wholly from the parent;
* ZERO, UNMAPPED, UNDEFINED: zeros (ZERO must; UNMAPPED and UNDEFINED may
  return zeros in every image type, spec 2.5.1.1).

Writes (all metadata changes under ``img.lock``, one log entry each, as in
:mod:`.image`):

* FULLY_PRESENT, or PARTIALLY_PRESENT with every written sector's bit set:
  in place, no lock;
* PARTIALLY_PRESENT otherwise: the data in place (invisible until its bits
  are set), then the bitmap sectors journaled;
* NOT_PRESENT: a write of the whole block allocates it FULLY_PRESENT (as
  Hyper-V does); a partial write allocates it PARTIALLY_PRESENT, allocating
  the chunk's 1 MiB sector bitmap block first if needed, and journals the
  payload entry, the bitmap entry and the bitmap bits as ONE log entry after
  the data is flushed -- nothing of the parent is copied;
* ZERO/UNMAPPED/UNDEFINED: the unwritten sectors must keep reading zeros,
  not the parent's data, so the block is allocated FULLY_PRESENT over the
  file's zero extension (as in a dynamic image).

A crash at any point leaves either the old state (the new block and bitmap
block are leaked space, reported by ``check``) or the new one in full.
"""

from __future__ import annotations

import struct

from blockdrv.iov import IOVector

from .constants import (BAT_OFFSET_MASK, BAT_STATE_MASK, LOG_SECTOR_SIZE,
                        PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
                        PAYLOAD_BLOCK_PARTIALLY_PRESENT, SB_BLOCK_PRESENT,
                        SECTOR_BITMAP_BLOCK_SIZE, ZERO_STATES)

_U64 = struct.Struct("<Q")

# block_status kinds
DATA, PARENT, ZERO, BAD = "data", "parent", "zero", "bad"


# ------------------------------------------------------------------- reads

async def read_parent(img, pos: int, n: int, part: IOVector) -> None:
    await img.read_backing(pos, n, part)      # the core's: zeros past the parent's end


async def readv(img, offset: int, nbytes: int, qiov: IOVector) -> None:
    lss = img.logical_sector_size
    for done, block, in_block, n in img._pieces(offset, nbytes):
        pos = offset + done
        raw = img.entry(block)
        state = raw & BAT_STATE_MASK
        part = qiov.slice(done, n)
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            await img._read_data((raw & BAT_OFFSET_MASK) + in_block, n, part)
        elif state == PAYLOAD_BLOCK_NOT_PRESENT:
            await read_parent(img, pos, n, part)
        elif state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            host = (raw & BAT_OFFSET_MASK) + in_block
            at = 0
            for mine, count in img.bitmaps.runs(block, in_block // lss, n // lss):
                length = count * lss
                sub = part.slice(at, length)
                if mine:
                    await img._read_data(host + at, length, sub)
                else:
                    await read_parent(img, pos + at, length, sub)
                at += length
        elif state in ZERO_STATES:
            part.memset(0, n)
        else:
            raise img._bad_state(block, state)


def _first_run(img, block: int, in_block: int, limit: int):
    """(kind, host or None, length) of the run at ``in_block`` inside ``block``."""
    raw = img.entry(block)
    state = raw & BAT_STATE_MASK
    n = min(img.block_size - in_block, limit)
    if state == PAYLOAD_BLOCK_FULLY_PRESENT:
        return DATA, (raw & BAT_OFFSET_MASK) + in_block, n
    if state == PAYLOAD_BLOCK_NOT_PRESENT:
        return PARENT, None, n
    if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        lss = img.logical_sector_size
        mine, count = img.bitmaps.runs(block, in_block // lss, -(-n // lss))[0]
        n = min(n, count * lss)
        return (DATA, (raw & BAT_OFFSET_MASK) + in_block, n) if mine else (PARENT, None, n)
    if state in ZERO_STATES:
        return ZERO, None, n
    return BAD, None, n


def block_status(img, offset: int, nbytes: int):
    """(kind, host offset or None, length) of the run at ``offset``."""
    bsize = img.block_size
    block, in_block = divmod(offset, bsize)
    kind, host, n = _first_run(img, block, in_block, nbytes)
    while n < nbytes and (in_block + n) % bsize == 0:
        block += 1
        k2, h2, n2 = _first_run(img, block, 0, nbytes - n)
        if k2 != kind or (host is not None and h2 != host + n):
            break
        n += n2
        if n2 < bsize:
            break
    return kind, host, n


# ------------------------------------------------------------------ writes

def _needs_lock(img, block: int, in_block: int, n: int) -> int | None:
    """Host offset when the write can go in place without metadata change."""
    raw = img.entry(block)
    state = raw & BAT_STATE_MASK
    if state == PAYLOAD_BLOCK_FULLY_PRESENT:
        return (raw & BAT_OFFSET_MASK) + in_block
    if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        lss = img.logical_sector_size
        if img.bitmaps.all_set(block, in_block // lss, n // lss):
            return (raw & BAT_OFFSET_MASK) + in_block
    return None


async def writev(img, offset: int, nbytes: int, qiov: IOVector) -> None:
    for done, block, in_block, n in img._pieces(offset, nbytes):
        part = qiov.slice(done, n)
        state = img.entry(block) & BAT_STATE_MASK
        if state not in (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                         PAYLOAD_BLOCK_NOT_PRESENT) and state not in ZERO_STATES:
            raise img._bad_state(block, state)
        host = _needs_lock(img, block, in_block, n)
        if host is not None:
            await img.file.co_pwritev(host, n, part)
        else:
            await _allocating_write(img, block, in_block, n, part)


class _BatPatch:
    """4 KiB sector images of the BAT region with some entries changed."""

    def __init__(self, img) -> None:
        self.img = img
        self.sectors: dict[int, bytearray] = {}

    def set(self, index: int, value: int) -> None:
        off = self.img.bat_offset + index * 8
        sec = off - off % LOG_SECTOR_SIZE
        buf = self.sectors.get(sec)
        if buf is None:
            buf = self.sectors[sec] = bytearray(self.img.file.pread(sec, LOG_SECTOR_SIZE))
        _U64.pack_into(buf, off - sec, value)

    def updates(self) -> list[tuple[int, bytes]]:
        return [(sec, bytes(buf)) for sec, buf in sorted(self.sectors.items())]


async def _allocating_write(img, block: int, in_block: int, n: int, part: IOVector) -> None:
    async with img.lock:
        host = _needs_lock(img, block, in_block, n)       # changed while we waited?
        if host is not None:
            await img.file.co_pwritev(host, n, part)
            return
        from .log import merge_sectors
        file, bitmaps, bat = img.file, img.bitmaps, img.bat
        lss = img.logical_sector_size
        first, count = in_block // lss, n // lss
        raw = img.entry(block)
        state = raw & BAT_STATE_MASK
        if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            base = raw & BAT_OFFSET_MASK
            await file.co_pwritev(base + in_block, n, part)
            new_bits = bitmaps.with_bits_set(block, first, count)
            updates = merge_sectors(file, bitmaps.block_offset(block), new_bits)
            img.log_writer.write_sectors_and_flush(file, updates, img._set_log_guid)
            bitmaps.publish(block, new_bits)
            return
        block_len = min(img.block_size, img.virtual_size - block * img.block_size)
        whole = in_block == 0 and n >= block_len
        if state in ZERO_STATES or whole:
            # The rest of the block must read zeros (or there is no rest).
            await img._allocate_full(block, in_block, n, part)
            return
        # NOT_PRESENT, partial write: PARTIALLY_PRESENT with bitmap bits.
        patch = _BatPatch(img)
        base = img._grow_file(img.block_size)
        sb_index = bitmaps.entry_index(block)
        sb_raw = bat.raw_at(sb_index)
        new_sb = None
        if sb_raw & BAT_STATE_MASK != SB_BLOCK_PRESENT:
            new_sb = img._grow_file(SECTOR_BITMAP_BLOCK_SIZE)
            sb_raw = new_sb | SB_BLOCK_PRESENT
            patch.set(sb_index, sb_raw)
        await file.co_pwritev(base + in_block, n, part)
        new_bits = bitmaps.with_bits_set(block, first, count)
        bits_at = (sb_raw & BAT_OFFSET_MASK) + (block % bitmaps.ratio) * bitmaps.bytes_per_block
        patch.set(bat.index(block), base | PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        updates = patch.updates() + merge_sectors(file, bits_at, new_bits)
        img.log_writer.write_sectors_and_flush(file, updates, img._set_log_guid)
        # Durable: publish bitmap entry and bits before the payload entry, so
        # a lock-free reader that sees PARTIALLY_PRESENT finds its bits.
        if new_sb is not None:
            bat.set_raw_at(sb_index, sb_raw)
        bitmaps.publish(block, new_bits)
        bat.set(block, PAYLOAD_BLOCK_PARTIALLY_PRESENT, base)


__all__ = ["readv", "writev", "block_status", "read_parent", "DATA", "PARENT", "ZERO", "BAD"]
