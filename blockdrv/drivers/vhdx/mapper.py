"""The extent mapper: a guest range as the extents it reads from (qemu's
``vhdx_block_translate``, for every image type).

``ExtentMapper.map(offset, nbytes)`` splits a range by payload block and,
inside PARTIALLY_PRESENT blocks, by sector bitmap runs; guest reads, writes
and block status all loop over its answer, differencing images included.
Each :class:`Extent` is one of

* ``DATA``   -- in this file at ``host`` (FULLY_PRESENT; a PARTIALLY_PRESENT
  block's sectors whose bit is 1);
* ``PARENT`` -- read from the backing chain at the same guest offset
  (differencing: NOT_PRESENT, and sectors whose bit is 0 -- or the whole block
  when its chunk has no sector bitmap block);
* ``ZERO``   -- reads zeros and this layer says so (ZERO, UNMAPPED; in a
  differencing image also UNDEFINED, which must not expose the parent);
* ``HOLE``   -- reads zeros, unallocated (NOT_PRESENT, UNDEFINED without parent);
* ``BAD``    -- a state the image type does not allow (reads and writes fail;
  PARTIALLY_PRESENT without a parent, the undefined state 4).

Spec 2.5.1.1 allows UNMAPPED and UNDEFINED to read as anything; we, like
qemu, return zeros.  Adjacent extents of one kind merge, DATA only where the
host offsets are contiguous, so a read of consecutive blocks stored one after
the other is one read of the file.
"""

from __future__ import annotations

from blockdrv._startup import NamedTuple

from blockdrv.errors import CorruptImageError

from .constants import (BAT_OFFSET_MASK, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
                        PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_UNDEFINED, ZERO_STATES)

DATA, PARENT, ZERO, HOLE, BAD = "data", "parent", "zero", "hole", "bad"
_MIXED = "mixed"                       # PARTIALLY_PRESENT with a parent: ask the bitmap
_STATUS_BLOCKS = 8                     # payload blocks one block status answer walks at most


class Extent(NamedTuple):
    kind: str
    length: int
    host: int | None                   # file offset (DATA)
    block: int                         # payload block of the extent's first byte


def _kinds(differencing: bool) -> tuple[str, ...]:
    """Extent kind per BAT state (0..7)."""
    kinds = [BAD] * 8
    for state in ZERO_STATES:
        kinds[state] = ZERO
    kinds[PAYLOAD_BLOCK_FULLY_PRESENT] = DATA
    if differencing:
        kinds[PAYLOAD_BLOCK_NOT_PRESENT] = PARENT
        kinds[PAYLOAD_BLOCK_PARTIALLY_PRESENT] = _MIXED
    else:
        kinds[PAYLOAD_BLOCK_NOT_PRESENT] = kinds[PAYLOAD_BLOCK_UNDEFINED] = HOLE
    return tuple(kinds)


class ExtentMapper:
    """Guest offsets to extents, over the BAT (and sector bitmaps) of one image."""

    def __init__(self, bat, block_size: int, logical_sector_size: int,
                 bitmaps=None) -> None:
        self.bat = bat
        self.block_size = block_size
        self.lss = logical_sector_size
        self.bitmaps = bitmaps                 # differencing images only
        self._kinds = _kinds(bitmaps is not None)

    def block_kind(self, block: int) -> tuple[str, int]:
        """(kind, raw BAT entry) of a whole payload block; ``"mixed"`` for a
        PARTIALLY_PRESENT block of a differencing image."""
        raw = self.bat.raw(block)
        return self._kinds[raw & 7], raw

    def lookup(self, offset: int, nbytes: int):
        """The first extent of the range as ``(kind, length, host)`` when the
        BAT alone answers (no sector bitmap to read), at most to the end of
        its block; else None.  The hot path of small guest I/O: no coroutine."""
        block, in_block = divmod(offset, self.block_size)
        raw = self.bat.raw(block)
        kind = self._kinds[raw & 7]
        if kind is _MIXED:
            return None
        n = min(self.block_size - in_block, nbytes)
        return kind, n, ((raw & BAT_OFFSET_MASK) + in_block if kind is DATA else None)

    async def map(self, offset: int, nbytes: int, *, first: bool = False) -> list[Extent]:
        """The extents of ``[offset, offset + nbytes)``, in order; with
        ``first``, only the first (for block status), as long as it goes."""
        bsize = self.block_size
        kinds = self._kinds
        raw_of = self.bat.raw
        # the extents so far as columns, made Extents at the end (no
        # namedtuple rebuilt on every merge)
        ek: list[str] = []
        el: list[int] = []
        eh: list = []
        eb: list[int] = []
        done = 0
        # Block status stops merging after a few blocks of data (as qcow2's
        # stops at an L2 slice): callers ask for everything up to the end of
        # the image, and the generic layer cuts a data answer at the host
        # file's next hole anyway, so walking every allocated block to the
        # end on each call made a walk over a dense image quadratic.
        status_limit = _STATUS_BLOCKS * bsize if first else nbytes
        while done < nbytes:
            if done >= status_limit and ek:
                break
            block, in_block = divmod(offset + done, bsize)
            n = min(bsize - in_block, nbytes - done)
            raw = raw_of(block)
            kind = kinds[raw & 7]
            if kind is _MIXED:
                pieces = await self._bitmap_runs(block, in_block, n, raw & BAT_OFFSET_MASK)
            elif kind is DATA:
                pieces = ((kind, n, (raw & BAT_OFFSET_MASK) + in_block),)
            else:
                if done + n < nbytes:
                    # the blocks after it in the same absent state: one
                    # extent, however many entries (a sparse 1 TiB image
                    # has a million of them)
                    last = (offset + nbytes - 1) // bsize
                    more = self.bat.same_run(block + 1, last + 1) \
                        if self.bat.raw(block + 1) == raw else 0
                    if more:
                        n = min(n + more * bsize, nbytes - done)
                pieces = ((kind, n, None),)
            for kind, n_, host in pieces:
                if ek:
                    if ek[-1] is kind and (host is None or eh[-1] + el[-1] == host):
                        el[-1] += n_
                        continue
                    if first:
                        return [Extent(ek[0], el[0], eh[0], eb[0])]
                ek.append(kind)
                el.append(n_)
                eh.append(host)
                eb.append(block)
            done += n
        return [Extent(*e) for e in zip(ek, el, eh, eb)]

    async def _bitmap_runs(self, block: int, in_block: int, n: int, base: int):
        """A PARTIALLY_PRESENT block's piece ``[in_block, in_block + n)`` as
        (kind, length, host) runs from its sector bitmap."""
        lss = self.lss
        lead = in_block % lss                  # unaligned (block status) start
        count = -(-(lead + n) // lss)
        out = []
        at = 0
        for mine, sectors in await self.bitmaps.co_runs(block, in_block // lss, count):
            length = min(sectors * lss - (lead if at == 0 else 0), n - at)
            out.append((DATA, length, base + in_block + at) if mine else (PARENT, length, None))
            at += length
        return out

    async def in_place(self, block: int, in_block: int, n: int) -> int | None:
        """Host offset when ``n`` bytes at ``in_block`` of ``block`` can be
        written in place with no metadata change (all DATA); else None."""
        kind, raw = self.block_kind(block)
        if kind is DATA:
            return (raw & BAT_OFFSET_MASK) + in_block
        if kind is _MIXED:
            runs = await self._bitmap_runs(block, in_block, n, raw & BAT_OFFSET_MASK)
            if len(runs) == 1 and runs[0][0] is DATA:
                return runs[0][2]
        return None


def bad_state(block: int, state: int, differencing: bool) -> CorruptImageError:
    import errno
    if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT and not differencing:
        return CorruptImageError(
            f"VHDX block {block} is PARTIALLY_PRESENT in an image without a parent",
            errno=errno.EIO)
    return CorruptImageError(f"VHDX block {block} has invalid BAT state {state}",
                             errno=errno.EIO)


__all__ = ["ExtentMapper", "Extent", "DATA", "PARENT", "ZERO", "HOLE", "BAD", "bad_state"]
