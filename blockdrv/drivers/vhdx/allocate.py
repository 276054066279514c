"""Writes that change metadata: allocating payload blocks and setting sector
bitmap bits, each as one :mod:`.transaction` under ``img.lock``.

Dynamic and fixed images (qemu 7.2's order, so that both tools leave the
same bytes): an absent block gets a new FULLY_PRESENT block at the end of
the file -- the file extended to the next 1 MiB boundary plus one block --,
the guest's bytes are written there (the rest reads zeros: the extension),
then its BAT entry is journaled.  In a session that acts on discards
(explicit ``discard=unmap``, see :mod:`.discard`) a freed block is taken
first, zero-filled before the guest's bytes go in.

Differencing images (HasParent, spec 2.4 and 2.5.1):

* PARTIALLY_PRESENT with some written sector's bit clear: the data in place
  (invisible until its bits are set), then the bitmap bytes journaled;
* NOT_PRESENT: a write of the whole block allocates it FULLY_PRESENT (as
  Hyper-V does); a partial write allocates it PARTIALLY_PRESENT, allocating
  the chunk's 1 MiB sector bitmap block first if needed, and journals the
  payload entry, the bitmap entry and the bitmap bits as ONE log entry --
  nothing of the parent is copied;
* ZERO/UNMAPPED/UNDEFINED: the unwritten sectors must keep reading zeros, not
  the parent's data, so the block is allocated FULLY_PRESENT as above.

A crash at any point leaves either the old state (a new block or bitmap
block is unreferenced space, reported by ``check``) or the new one in full.
"""

from __future__ import annotations

from blockdrv.iov import IOVector

from .bat import encode_entry
from .constants import (ALIGNMENT, BAT_OFFSET_MASK, BAT_STATE_MASK,
                        PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
                        PAYLOAD_BLOCK_PARTIALLY_PRESENT, SB_BLOCK_PRESENT,
                        SECTOR_BITMAP_BLOCK_SIZE, round_up)


async def grow_file(file, nbytes: int) -> int:
    """Extend the file by ``nbytes`` at the next 1 MiB boundary; returns that offset."""
    at = round_up(file.getlength(), ALIGNMENT)
    await file.co_truncate(at + nbytes)
    return at


async def payload_space(img, fill: bool = True) -> int:
    """Room for a new payload block: a block freed by a discard (zeroed
    when ``fill``: the guest's bytes go in after, the rest must read zeros;
    the transaction flushes it before the BAT names it), else the file grown."""
    from .discard import take_space
    at = take_space(img)
    if at is None:
        return await grow_file(img.file, img.block_size)
    if fill:
        await img.file.co_pwrite_zeroes(at, img.block_size)
    return at


async def allocate(img, block: int, in_block: int, n: int, part: IOVector) -> None:
    """Lock held, ``block`` not writable in place: write ``part`` there,
    allocating what it needs."""
    raw = img.bat.raw(block)
    state = raw & BAT_STATE_MASK
    if img.differencing:
        if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            await _set_bits(img, block, raw & BAT_OFFSET_MASK, in_block, n, part)
            return
        block_len = min(img.block_size, img.virtual_size - block * img.block_size)
        if state == PAYLOAD_BLOCK_NOT_PRESENT and not (in_block == 0 and n >= block_len):
            await _allocate_partial(img, block, in_block, n, part)
            return
    await allocate_full(img, block, in_block, n, part)


async def allocate_full(img, block: int, in_block: int, n: int, part: IOVector) -> None:
    """A new FULLY_PRESENT block at the end of the file holding the guest's
    ``n`` bytes at ``in_block``, its BAT entry journaled and then published
    (until then other requests see the block absent: readers get zeros,
    writers queue on the lock, and no write can land in -- nor a flush
    complete over -- a block whose entry is not yet durable)."""
    file = img.file
    new_offset = await payload_space(img)
    async with img.transaction() as tx:
        await file.co_pwritev(new_offset + in_block, n, part)
        tx.set_bat(img.bat.index(block), encode_entry(PAYLOAD_BLOCK_FULLY_PRESENT, new_offset))


async def _set_bits(img, block: int, base: int, in_block: int, n: int,
                    part: IOVector) -> None:
    bitmaps, lss = img.bitmaps, img.logical_sector_size
    await img.file.co_pwritev(base + in_block, n, part)
    new_bits = await bitmaps.co_with_bits_set(block, in_block // lss, n // lss)
    async with img.transaction() as tx:
        tx.write(bitmaps.block_offset(block), new_bits)
        tx.on_commit(lambda: bitmaps.publish(block, new_bits))


async def _allocate_partial(img, block: int, in_block: int, n: int, part: IOVector) -> None:
    """NOT_PRESENT, partial write: PARTIALLY_PRESENT with the written bits set."""
    file, bitmaps, bat = img.file, img.bitmaps, img.bat
    lss = img.logical_sector_size
    base = await payload_space(img, fill=False)
    async with img.transaction() as tx:
        # Published in this order once durable: bitmap entry and bits before
        # the payload entry, so a lock-free reader that sees
        # PARTIALLY_PRESENT finds its bits.
        sb_index = bitmaps.entry_index(block)
        sb_raw = bat.raw_at(sb_index)
        if sb_raw & BAT_STATE_MASK != SB_BLOCK_PRESENT:
            sb_raw = await grow_file(file, SECTOR_BITMAP_BLOCK_SIZE) | SB_BLOCK_PRESENT
            tx.set_bat(sb_index, sb_raw)
        await file.co_pwritev(base + in_block, n, part)
        new_bits = await bitmaps.co_with_bits_set(block, in_block // lss, n // lss)
        bits_at = (sb_raw & BAT_OFFSET_MASK) + (block % bitmaps.ratio) * bitmaps.bytes_per_block
        tx.write(bits_at, new_bits)
        tx.on_commit(lambda: bitmaps.publish(block, new_bits))
        tx.set_bat(bat.index(block), base | PAYLOAD_BLOCK_PARTIALLY_PRESENT)


__all__ = ["allocate", "allocate_full", "grow_file", "payload_space"]
