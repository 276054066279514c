"""qemu's host cluster allocation policy (qcow2-refcount.c), so that the same
operations leave the same bytes in the file as qemu 7.2.

``Allocator`` keeps the refcount table in memory and refcount blocks in a
cache: every change is written where qemu would write it (a whole refcount
block cluster, an 8-byte table entry, a new table), so stale bytes qemu
leaves behind (a freed refcount table) stay behind here too.  Table writes
go out at once; changed blocks at once too, unless ``writeback`` is set: then
they wait in ``dirty`` until the owner calls :meth:`write_blocks` (qemu's
refcount block cache, which a writer writes back before the L2 tables that
depend on it).

The policy: first fit from ``free_index`` (the lowest cluster known free);
a refcount block that does not exist yet is allocated at the next free
cluster and the caller's search restarts (qemu's -EAGAIN); a full refcount
table is replaced by a bigger one placed, with self-describing refcount
blocks, after the last refcount block's coverage, and the old table freed.
"""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Callable

from blockdrv.errors import CorruptImageError, NoSpaceError

from . import refcount as rc
from .constants import MAX_CLUSTER_OFFSET, MAX_REFTABLE_BYTES


class _Again(Exception):
    """qemu's -EAGAIN: metadata was allocated, restart the search."""


class Allocator:
    def __init__(self, cluster_bits: int, order: int, table: list[int], table_offset: int,
                 read: Callable[[int, int], bytes], write: Callable[[int, bytes], None],
                 set_table: Callable[[int, int], None]) -> None:
        self.cbits = cluster_bits
        self.cs = 1 << cluster_bits
        self.order = order
        self.per_block = rc.entries_per_block(self.cs, order)
        self.max_refcount = (1 << (1 << order)) - 1
        self.table = table
        self.table_offset = table_offset
        self.read, self.write, self.set_table = read, write, set_table
        self.blocks: dict[int, bytearray] = {}
        self.free_index = 0
        self._block_clusters: set[int] | None = None    # see block_clusters()
        # called with each cluster index whose refcount drops to zero (a
        # writer discards freed clusters in the file, as qemu's passthrough)
        self.on_zero: Callable[[int], None] | None = None
        # a writer orders a new refcount block before the table entry naming
        # it (qemu flushes its refcount cache first); create needs no order
        self.barrier: Callable[[], None] = lambda: None
        self.writeback = False
        self.dirty: set[int] = set()     # offsets of blocks changed, not yet written

    def _store(self, offset: int) -> None:
        if self.writeback:
            self.dirty.add(offset)
        else:
            self.write(offset, bytes(self.blocks[offset]))

    def write_blocks(self) -> None:
        """Write every changed block (in file order: one pass over the disk)."""
        for offset in sorted(self.dirty):
            self.write(offset, bytes(self.blocks[offset]))
            self.dirty.discard(offset)

    # -- lookups -------------------------------------------------------------------

    def _block(self, offset: int) -> bytearray:
        blk = self.blocks.get(offset)
        if blk is None:
            if offset % self.cs:
                raise CorruptImageError(f"Refblock offset {offset:#x} unaligned")
            blk = self.blocks[offset] = bytearray(self.read(offset, self.cs))
        return blk

    def refcount(self, index: int) -> int:
        t = index // self.per_block
        if t >= len(self.table) or not self.table[t] & rc.REFT_OFFSET_MASK:
            return 0
        return rc.get(self._block(self.table[t] & rc.REFT_OFFSET_MASK),
                      index % self.per_block, self.order)

    # -- qemu's alloc_clusters_noref / qcow2_alloc_clusters / _at -------------------------

    def _noref(self, nbytes: int) -> int:
        n = -(-nbytes // self.cs)
        i = 0
        while i < n:
            idx = self.free_index
            self.free_index += 1
            i = 0 if self.refcount(idx) else i + 1
        if self.free_index - 1 > MAX_CLUSTER_OFFSET >> self.cbits:
            raise NoSpaceError("File too large")
        return (self.free_index - n) << self.cbits

    def alloc(self, nbytes: int) -> int:
        while True:
            offset = self._noref(nbytes)
            try:
                self.update(offset, nbytes, 1)
                return offset
            except _Again:
                continue

    def alloc_at(self, offset: int, n: int) -> int:
        """Allocate up to ``n`` clusters at ``offset``; how many were free."""
        while True:
            first = offset >> self.cbits
            i = 0
            while i < n and not self.refcount(first + i):
                i += 1
            try:
                self.update(offset, i << self.cbits, 1)
                return i
            except _Again:
                continue

    def free(self, offset: int, nbytes: int) -> None:
        self.update(offset, nbytes, -1)

    # -- qemu's update_refcount ------------------------------------------------------

    def update(self, offset: int, nbytes: int, addend: int) -> None:
        if nbytes <= 0:
            return
        start = offset >> self.cbits
        last = (offset + nbytes - 1) >> self.cbits
        done = start
        old_t = -1
        blk = None
        blk_off = dirty = None
        try:
            for ci in range(start, last + 1):
                t = ci // self.per_block
                if t != old_t:
                    if dirty is not None:       # one write per block, as qemu's cache
                        self._store(dirty)
                        dirty = None
                    try:
                        blk_off = self._refblock_for(ci)
                    except _Again:
                        self.free_index = min(self.free_index, start)
                        raise
                    blk = self._block(blk_off)
                old_t = t
                i = ci % self.per_block
                value = rc.get(blk, i, self.order) + addend
                if value < 0 or value > self.max_refcount:
                    raise CorruptImageError("Refcount overflow or underflow")
                if value == 0 and ci < self.free_index:
                    self.free_index = ci
                rc.put(blk, i, self.order, value)
                if value == 0 and addend < 0 and self.on_zero is not None:
                    self.on_zero(ci)
                dirty = blk_off
                done = ci + 1
        except _Again:
            if done > start:                      # undo, as qemu does
                self.update(start << self.cbits, (done - start) << self.cbits, -addend)
            raise
        finally:
            if dirty is not None:
                self._store(dirty)

    def block_clusters(self) -> set[int]:
        """The cluster indexes of the refcount blocks the table names, kept
        until the table changes (every guest write's overlap check asks)."""
        if self._block_clusters is None:
            self._block_clusters = {(e & rc.REFT_OFFSET_MASK) >> self.cbits
                                    for e in self.table if e & rc.REFT_OFFSET_MASK}
        return self._block_clusters

    # -- qemu's alloc_refcount_block / qcow2_refcount_area -----------------------------

    def _refblock_for(self, ci: int) -> int:
        t = ci // self.per_block
        if t < len(self.table) and self.table[t] & rc.REFT_OFFSET_MASK:
            return self.table[t] & rc.REFT_OFFSET_MASK
        new = self._noref(self.cs)
        if new == 0:
            raise CorruptImageError("Preventing invalid allocation of refcount block "
                                    "at offset 0")
        blk = bytearray(self.cs)
        if (new >> self.cbits) // self.per_block == t:
            rc.put(blk, (new >> self.cbits) % self.per_block, self.order, 1)
        else:
            self.update(new, self.cs, 1)          # described elsewhere
        self.blocks[new] = blk
        self._store(new)
        self.barrier()
        if t < len(self.table):
            self.table[t] = new
            self._block_clusters = None
            self.write(self.table_offset + t * 8, new.to_bytes(8, "big"))
            raise _Again
        used = -(-max(ci + 1, (new >> self.cbits) + 1) // self.per_block)
        self.refcount_area(used * self.per_block * self.cs, 0, False, t, new)
        raise _Again

    def refcount_area(self, start: int, additional: int, exact: bool,
                      new_index: int = 0, new_offset: int = 0) -> int:
        total, _ = rc.metadata_clusters(start // self.cs + additional, self.cs, self.order,
                                        not exact)
        if total * 8 > MAX_REFTABLE_BYTES:
            raise NoSpaceError("File too large")
        area = (start // self.cs) // self.per_block
        size = total if exact else total + -(-total // 2)
        per_cluster = self.cs // 8
        size = -(-size // per_cluster) * per_cluster
        table_clusters = size * 8 // self.cs
        table = (self.table + [0] * size)[:size]
        if new_offset:
            table[new_index] = new_offset
        missing = sum(1 for i in range(area, total) if not table[i])
        table_offset = start + missing * self.cs
        end = table_offset + table_clusters * self.cs
        block_offset = start
        for i in range(area, total):
            if table[i]:
                off = table[i] & rc.REFT_OFFSET_MASK
                blk = self._block(off)
            else:
                off = table[i] = block_offset
                blk = self.blocks[off] = bytearray(self.cs)
                block_offset += self.cs
            first = i * self.per_block * self.cs
            if first < end:
                j = (start - first) // self.cs if first < start else 0
                for k in range(j, min((end - first) // self.cs, self.per_block)):
                    rc.put(blk, k, self.order, 1)
            self._store(off)
        self.barrier()
        self.write(table_offset, rc.pack_table(table))
        old_offset, old_size = self.table_offset, len(self.table)
        self.table, self.table_offset = table, table_offset
        self._block_clusters = None
        self.set_table(table_offset, table_clusters)
        self.free(old_offset, old_size * 8)
        return end
