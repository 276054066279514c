"""Sector bitmap blocks of differencing images (spec 2.4, 2.5.1.2).

One 1 MiB sector bitmap block per chunk (2**23 logical sectors); its BAT
entry follows the chunk's ``chunk_ratio`` payload entries.  Bit ``i`` (bit 0
of byte 0 first) says where logical sector ``i`` of the chunk lives: 1 in
this file (inside its PARTIALLY_PRESENT payload block), 0 in the parent.
Each payload block owns ``block_size / sector_size / 8`` consecutive bytes
(``1 MiB / chunk_ratio``).

Sector bitmap blocks are VHDX metadata, not payload (spec 2.3: the log "MUST
be used to perform updates to all metadata except the header and MUST NOT be
used for updates to the payload blocks"), so every bitmap change is
journaled -- in the same log entry as the BAT entries it goes with, so an
allocation (payload entry, bitmap entry, bitmap bits) replays or vanishes as
one.  Bits only ever go from 0 to 1; the in-memory copy is updated once the
journal entry is durable, like the BAT (see :mod:`.image`).
"""

from __future__ import annotations

from .aio import blocking
from .bat import bitmap_index
from .constants import BAT_OFFSET_MASK, BAT_STATE_MASK, SB_BLOCK_PRESENT



class SectorBitmaps:
    """Cached access to the bitmap bytes of each payload block.

    ``read`` is the image's awaitable metadata read (through an in-memory
    log replay when there is one): a bitmap's first use from a guest read may
    suspend on the file.
    """

    def __init__(self, bat, block_size: int, logical_sector_size: int, read) -> None:
        self.bat = bat
        self._read = read
        self.ratio = bat.chunk_ratio
        self.lss = logical_sector_size
        self.sectors_per_block = block_size // self.lss
        self.bytes_per_block = self.sectors_per_block // 8
        self._cache: dict[int, bytearray] = {}

    # ---------------------------------------------------------------- entries
    def entry_index(self, block: int) -> int:
        return bitmap_index(block // self.ratio, self.ratio)

    def entry(self, block: int) -> int:
        return self.bat.raw_at(self.entry_index(block))

    def present(self, block: int) -> bool:
        return self.entry(block) & BAT_STATE_MASK == SB_BLOCK_PRESENT

    def block_offset(self, block: int) -> int:
        """File offset of ``block``'s bytes inside its chunk's bitmap block."""
        return (self.entry(block) & BAT_OFFSET_MASK) + (block % self.ratio) * self.bytes_per_block

    # ------------------------------------------------------------------- bits
    async def co_bits(self, block: int) -> bytearray | None:
        """The block's bitmap bytes, or None when its chunk has no bitmap
        block (every sector then comes from the parent)."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        if not self.present(block):
            return None
        data = bytearray(await self._read(self.block_offset(block), self.bytes_per_block))
        self._cache[block] = data
        return data

    async def co_runs(self, block: int, first: int, count: int) -> list[tuple[bool, int]]:
        """(in this file?, sectors) runs covering sectors ``[first, first+count)``
        of ``block``, adjacent runs of the same kind merged."""
        bits = await self.co_bits(block)
        if bits is None:
            return [(False, count)]
        import numpy as np
        lo, hi = first // 8, -(-(first + count) // 8)
        arr = np.unpackbits(np.frombuffer(bytes(bits[lo:hi]), np.uint8), bitorder="little")
        arr = arr[first - lo * 8:first - lo * 8 + count]
        edges = np.flatnonzero(arr[1:] != arr[:-1]) + 1
        starts = [0, *edges.tolist()]
        ends = [*edges.tolist(), count]
        return [(bool(arr[s]), e - s) for s, e in zip(starts, ends)]

    async def co_with_bits_set(self, block: int, first: int, count: int) -> bytearray:
        """A copy of the block's bitmap bytes with sectors ``[first, first+count)`` set."""
        bits = await self.co_bits(block)
        out = bytearray(self.bytes_per_block) if bits is None else bytearray(bits)
        value = int.from_bytes(out, "little")
        value |= ((1 << count) - 1) << first
        return bytearray(value.to_bytes(self.bytes_per_block, "little"))

    def publish(self, block: int, new: bytes) -> None:
        """The journaled bits are durable: make them visible."""
        self._cache[block] = bytearray(new)

    # -- synchronous forms (no event loop: check, tests) ----------------------
    def bits(self, block: int) -> bytearray | None:
        return blocking(self.co_bits(block))

    def all_set(self, block: int, first: int, count: int) -> bool:
        runs = blocking(self.co_runs(block, first, count))
        return len(runs) == 1 and runs[0][0]
