"""Discards and zero writes as payload block states (spec 2.5.1.1), and the
reuse of the space they free.

When the driver acts
--------------------
Only when the image was opened with an explicit ``discard=unmap`` (or
``on``) open option: ``blockdrv io -d unmap``, ``nbd --discard=unmap``, the
FUSE export, ``open_image(..., discard="unmap")``.  qemu-io sets
BDRV_O_UNMAP by default, but qemu 7.2's vhdx driver has neither discard nor
write-zeroes, so a qemu-io script leaves a VHDX file as if its discards were
never issued and its ``write -z`` (with or without ``-u``) wrote a zero
buffer.  ``blockdrv io`` and ``open_image`` therefore set ``O_UNMAP`` by
default *without* the option (raw files still punch holes, as with qemu-io),
and the VHDX driver keeps qemu's behaviour unless the option says
otherwise (``VHDXImage.unmap``).  A zero write without ``WRITE_UNMAP``
always falls back to writing zeros, as today.

Which state (spec 2.5.1.1's table)
----------------------------------
* Fixed images (LeaveBlockAllocated, spec 2.6.2.1): nothing changes.  The
  file must stay fully provisioned, so no space could be freed; footnote <6>
  forbids NOT_PRESENT there.  Discards are dropped (their bytes are
  "undefined" afterwards: the old data is a valid answer); zero writes write
  zeros in place.
* Dynamic images: a discard covering a whole block journals it to
  ``PAYLOAD_BLOCK_UNMAPPED`` -- the state the spec defines for exactly this
  ("all the virtual disk sectors in the payload block were issued an UNMAP
  command") -- with FileOffsetMB zero (option 2), so no reader can find the
  old bytes once the space is reused (footnote <11>).  A zero write with
  ``WRITE_UNMAP`` journals ``PAYLOAD_BLOCK_ZERO``: the only state whose reads
  MUST return zeros; UNMAPPED may read the old contents elsewhere.
* Differencing images: both become ``PAYLOAD_BLOCK_ZERO``.  NOT_PRESENT would
  let the parent show through; UNMAPPED's "contents immediately before" is
  ill-defined for a block partly served by the parent, and ZERO is the
  tightly defined state footnotes <8>-<10> recommend.  (We, like qemu, read
  ZERO and UNMAPPED as zeros in every image type.)

Partial blocks are zeroed through the ordinary write path: in place where
the block is present (a PARTIALLY_PRESENT block gets its bits set, so the
parent does not show through), a NOT_PRESENT block of a child gets the zeros
written like any guest write; a block that already reads zeros at this layer
is left alone.  Discards are shrunk to whole logical sectors first (what
lies outside is left as it is, which a discard allows).

Crash safety and reuse
----------------------
Whole blocks change in one transaction per batch (the BAT sectors in one log
entry).  The freed offsets enter ``img.free`` only once that entry is
durable, and their host range is then punched (best effort) so that the
file takes no disk space for them.  An allocation takes the lowest freed
offset before it grows the file (:func:`take_space`) -- but only while no
other guest request is in flight (``img.inflight``): a lock-free read or
in-place write that looked the block up before it was freed could otherwise
land in a block now owned by another one.  A reused block is zero-filled
around the guest's bytes before its BAT entry is journaled (the transaction
flushes the file first), so a crash leaves it unreferenced or complete.

A PARTIALLY_PRESENT block that becomes ZERO keeps its bitmap bits: a ZERO
block is only ever allocated FULLY_PRESENT again (see :mod:`.allocate`), so
they are never read.
"""

from __future__ import annotations

import heapq

from .bat import encode_entry
from .constants import (BAT_OFFSET_MASK, BAT_STATE_MASK, PAYLOAD_BLOCK_FULLY_PRESENT,
                        PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_UNMAPPED,
                        PAYLOAD_BLOCK_ZERO)

# Payload entries per transaction: at most 8 BAT sectors (32 KiB of log).
BATCH = 4096
_PRESENT = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)


def target_state(img, zero_write: bool) -> int | None:
    """The state whole blocks go to; None: the driver does not act."""
    if img.fixed:
        return None
    if zero_write or img.differencing:
        return PAYLOAD_BLOCK_ZERO
    return PAYLOAD_BLOCK_UNMAPPED


def _needs(img, raw: int, target: int) -> bool:
    """Whether a whole block in state ``raw`` must move to ``target``."""
    state = raw & BAT_STATE_MASK
    if state in _PRESENT:
        return True
    if target == PAYLOAD_BLOCK_UNMAPPED:
        return False                 # a dynamic image's absent block already reads zeros
    return state != PAYLOAD_BLOCK_ZERO   # ZERO MUST read zeros: make it so


async def co_unmap(img, offset: int, nbytes: int, *, zero_write: bool) -> None:
    """Discard (``zero_write`` False) or zero-write-with-unmap ``[offset,
    offset + nbytes)``; the caller checked :func:`target_state`."""
    target = target_state(img, zero_write)
    lss, bsize = img.logical_sector_size, img.block_size
    end = min(offset + nbytes, img.virtual_size)
    if not zero_write:                           # shrink to whole sectors
        offset = -(-offset // lss) * lss
        end = end // lss * lss
    whole: list[int] = []
    partial: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        block, in_block = divmod(pos, bsize)
        block_len = min(bsize, img.virtual_size - block * bsize)
        n = min(block_len - in_block, end - pos)
        if in_block == 0 and n == block_len:
            whole.append(block)
        else:
            partial.append((pos, n))
        pos += n
    for pos, n in partial:
        await _zero_piece(img, pos, n)
    for i in range(0, len(whole), BATCH):
        async with img.lock:
            await _unmap_blocks(img, whole[i:i + BATCH], target)


async def _zero_piece(img, offset: int, n: int) -> None:
    """Zeros over part of one block, unless it reads zeros at this layer already."""
    from .mapper import HOLE, ZERO
    kind, _ = img.mapper.block_kind(offset // img.block_size)
    if kind is ZERO or kind is HOLE:
        return
    from blockdrv.iov import IOVector
    await img.writev(offset, n, IOVector.from_buffer(bytes(n)))


async def _unmap_blocks(img, blocks: list[int], target: int) -> None:
    """Lock held: one transaction moving ``blocks`` to ``target``; their
    space joins the free list once it is durable."""
    bat = img.bat
    todo = [(b, bat.raw(b)) for b in blocks]
    todo = [(b, raw) for b, raw in todo if _needs(img, raw, target)]
    if not todo:
        return
    if img.headers.first_visible_write:
        await img.headers.co_mark_data_write()
    freed = [raw & BAT_OFFSET_MASK for _, raw in todo if raw & BAT_STATE_MASK in _PRESENT]
    async with img.transaction() as tx:
        for block, _ in todo:
            tx.set_bat(bat.index(block), encode_entry(target))
        if freed:
            tx.on_commit(lambda: release(img, freed))
    # Still under the lock: no allocation can have taken them yet.
    await _punch(img, freed)


def release(img, offsets) -> None:
    """Offsets of payload blocks no entry references any more: reusable."""
    for off in offsets:
        heapq.heappush(img.free, off)


async def _punch(img, offsets) -> None:
    """Give the freed ranges' disk space back (best effort: a file that
    cannot punch holes keeps them; they are reused all the same)."""
    from blockdrv.errors import BlockDriverError
    for off in offsets:
        try:
            await img.file.co_pdiscard(off, img.block_size)
        except BlockDriverError:
            return


def take_space(img) -> int | None:
    """A freed payload block's offset for a new allocation (lock held), or
    None: grow the file.  Only while the allocating request is the only
    guest request in flight (see the module docstring).  The first call of
    a session that acts on discards also collects the free space earlier
    sessions left (:func:`.space.free_blocks`)."""
    if not img.unmap or img.fixed:
        return None
    if not img.free_scanned:
        from .space import free_blocks
        img.free_scanned = True
        # (it finds the blocks freed so far this session too)
        img.free[:] = sorted(set(img.free) | set(free_blocks(img)))
    if img.inflight > 1:
        return None
    length = img.file.getlength()
    while img.free:
        at = heapq.heappop(img.free)
        if at + img.block_size <= length:      # (never past the end: a safety net)
            return at
    return None


__all__ = ["co_unmap", "target_state", "take_space", "release", "BATCH"]
