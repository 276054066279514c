"""qcow2 consistency check and repair (qemu's qcow2_check_refcounts).

The check rebuilds every cluster's reference count from what points at it
(header, active and snapshot L1/L2 tables, compressed runs, the snapshot
table, the refcount table and its blocks) in an in-memory table, then
compares it with the on-disk refcounts.  The counters, the lines printed and
their order are qemu-img 7.2's, so scripts reading either tool agree.

Repairs write through ``out`` (an object with ``pwrite``, ``pwrite_zeroes``,
``truncate`` and ``flush``, by default the image's protocol node): fixing counts in place
(leaks and refcounts too low), zeroing misaligned preallocated L2 entries,
extending the file under a refcount block past its end, OFLAG_COPIED, and
rebuilding the refcount structure from scratch when an on-disk refcount
block cannot be trusted.
"""

from __future__ import annotations

import itertools
import struct
from array import array

from blockdrv.common import FIX_ERRORS, FIX_LEAKS, WRITE_UNMAP, CheckResult
from blockdrv.errors import BlockIOError

from . import bitmaps as bm
from . import l2 as L
from . import refcount as rc
from .constants import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_L1_BYTES
from .snapshot import parse_table

L2E_STD_RESERVED = 0x3F000000000001FE
L1E_RESERVED = 0x7F000000000001FF
BITMAP_ALL_ALLOC = 0xFFFFFFFF
CHECK_FRAG_INFO = 2
# Clusters the in-memory table may count (qemu's bound is INT_MAX; this one
# keeps the table and the per-cluster walk in reasonable memory and time:
# 4 TiB of 64 KiB clusters, 32 GiB of 512-byte ones).
MAX_CLUSTERS = 1 << 26
_HEADER_REFTABLE = 48            # refcount_table_offset, refcount_table_clusters


class CheckFailed(BlockIOError):
    """An internal error ended the check (qemu's ``ret < 0`` paths: qemu-img
    then prints no report, only "Check failed: <why>").  ``result`` holds
    the lines printed so far."""

    def __init__(self, why: str, result: CheckResult | None = None, *,
                 errno: int | None = None) -> None:
        super().__init__(why, errno=errno)
        self.result = result


class Qcow2Check:
    """One check (and repair) pass over an open :class:`.image.Qcow2Image`."""

    def __init__(self, img, fix: int = 0, out=None) -> None:
        self.img = img
        self.h = img.h
        self.cs = img.cs
        self.cbits = img.cbits
        self.file = img.file
        self.out = out if out is not None else img.file
        self.fix = fix
        self.calc_fix = fix          # the rebuild's recount repairs nothing
        self.order = self.h.refcount_order
        self.max_ref = (1 << (1 << self.order)) - 1
        self.per_block = rc.entries_per_block(self.cs, self.order)
        self.res = CheckResult()
        self.rebuild = False
        self.reftable_offset = self.h.refcount_table_offset
        self.reftable = self._read_table(self.reftable_offset,
                                         self.h.refcount_table_clusters * self.cs // 8)
        self.old_reftable = self.reftable        # what qemu's overlap check knows
        self.corrupted = False                   # marked corrupt: no more writes
        # entries as wide as the image's refcounts (qemu's table is as compact)
        self.typecode = next(t for t in "BHIQ" if array(t).itemsize * 8 >= 1 << self.order)
        self.imrt = array(self.typecode)
        self._blocks: dict[int, bytearray] = {}
        self._decoded: dict[int, list[int]] = {}

    # -- I/O ------------------------------------------------------------------------

    def _flen(self) -> int:
        return self.file.total_size

    def _pread(self, offset: int, n: int) -> bytes:
        # qemu reads past the end of the file as zeros
        inside = max(0, min(n, self._flen() - offset))
        data = bytes(self.file.pread(offset, inside)) if inside else b""
        return data.ljust(n, b"\0")

    def _read_table(self, offset: int, entries: int) -> list[int]:
        if not entries:
            return []
        raw = self._pread(offset, entries * 8)
        return list(struct.unpack(f">{entries}Q", raw))

    def _say(self, line: str) -> None:
        self.res.messages.append(line)

    # -- the in-memory refcount table ----------------------------------------------

    def _grow(self, n: int) -> None:
        if n > MAX_CLUSTERS:
            self.res.check_errors += 1
            raise CheckFailed("File too large", self.res)
        if n > len(self.imrt):
            self.imrt.frombytes(bytes(self.imrt.itemsize * (n - len(self.imrt))))

    def inc(self, offset: int, size: int) -> None:
        """qemu's qcow2_inc_refcounts_imrt: count ``[offset, offset+size)``."""
        if size <= 0:
            return
        cs = self.cs
        # the last cluster may be partly beyond the end of the file, no more
        if offset + size - self._flen() >= cs:
            self._say("ERROR: counting reference for region exceeding the end of the "
                      f"file by one cluster or more: offset {offset:#x} size {size:#x}")
            self.res.corruptions += 1
            return
        first, last = offset // cs, (offset + size - 1) // cs
        self._grow(last + 1)
        imrt = self.imrt
        for k in range(first, last + 1):
            if imrt[k] >= self.max_ref:
                self._say(f"ERROR: overflow cluster offset={k * cs:#x}")
                self._say("Use qemu-img amend to increase the refcount entry width or "
                          "qemu-img convert to create a clean copy if the image cannot "
                          "be opened for writing")
                self.res.corruptions += 1
                continue
            imrt[k] += 1

    # -- L1 and L2 tables -------------------------------------------------------------

    def check_l1(self, l1_offset: int, l1_size: int, flags: int, active: bool) -> None:
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8)
        for entry in self._read_table(l1_offset, l1_size):
            if not entry:
                continue
            if entry & L1E_RESERVED:
                self._say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2_offset = entry & L.L1E_OFFSET_MASK
            self.inc(l2_offset, self.cs)
            if l2_offset % self.cs:
                self._say(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                          "L1 entry corrupted")
                self.res.corruptions += 1
            self.check_l2(l2_offset, flags, active)

    def check_l2(self, l2_offset: int, flags: int, active: bool) -> None:
        img, res, cs = self.img, self.res, self.cs
        ext = img.extl2
        esize = img.esize
        table = bytearray(self._pread(l2_offset, cs))
        frag = flags & CHECK_FRAG_INFO
        next_contiguous = 0
        for i, (entry, bitmap) in enumerate(_entries(table, ext)):
            if not entry and not bitmap:
                continue
            kind = L.cluster_type(entry, ext)
            if kind != L.COMPRESSED and entry & L2E_STD_RESERVED:
                self._say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if kind == L.COMPRESSED:
                if entry & L.OFLAG_COPIED:
                    mask = (1 << L.compressed_shift(self.cbits)) - 1
                    self._say(f"ERROR: coffset={entry & mask:#x}: copied flag must never "
                              "be set for compressed clusters")
                    entry &= ~L.OFLAG_COPIED
                    res.corruptions += 1
                if bitmap:
                    self._say(f"ERROR compressed cluster {i} with non-zero subcluster "
                              f"allocation bitmap, entry={entry:#x}")
                    res.corruptions += 1
                    continue
                desc = L.parse_compressed(entry, self.cbits)
                self.inc(desc.offset, desc.size)
                if frag:
                    # compressed clusters are fragmented by nature (qemu counts so)
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif kind in (L.NORMAL, L.ZERO_ALLOC):
                offset = entry & L.L2E_OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self._say(f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                              "subcluster allocation bitmap")
                if offset % cs:
                    res.corruptions += 1
                    has_data = (bitmap & BITMAP_ALL_ALLOC if ext
                                else not entry & L.OFLAG_ZERO)
                    if not has_data:
                        fixing = self.calc_fix & FIX_ERRORS
                        self._say(f"{'Repairing' if fixing else 'ERROR'} offset={offset:x}: "
                                  "Preallocated cluster is not properly aligned; L2 entry "
                                  "corrupted.")
                        if fixing and self._zero_entry(l2_offset, table, i):
                            continue
                    else:
                        self._say(f"ERROR offset={offset:x}: Data cluster is not properly "
                                  "aligned; L2 entry corrupted.")
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                self.inc(offset, cs)
            elif kind == L.UNALLOCATED and bitmap & BITMAP_ALL_ALLOC:
                res.corruptions += 1
                self._say("ERROR: Unallocated cluster has non-zero subcluster allocation "
                          "map")

    def _zero_entry(self, l2_offset: int, table: bytearray, i: int) -> bool:
        """qemu's fix_l2_entry_by_zero: a preallocated entry at a misaligned
        host offset becomes a plain zero cluster (extended L2: its allocated
        subclusters read as zeros)."""
        img = self.img
        if img.extl2:
            bitmap = int.from_bytes(table[i * 16 + 8:i * 16 + 16], "big")
            bitmap = (bitmap | bitmap << 32) & (BITMAP_ALL_ALLOC << 32)
            raw = (0).to_bytes(8, "big") + bitmap.to_bytes(8, "big")
        else:
            raw = L.OFLAG_ZERO.to_bytes(8, "big")
        table[i * img.esize:(i + 1) * img.esize] = raw
        try:
            self.out.pwrite(l2_offset + i * img.esize, raw)
            self.out.flush()
        except Exception as exc:  # noqa: BLE001 - reported as qemu does
            self._say(f"ERROR: Failed to overwrite L2 table entry: {exc}")
            self.res.check_errors += 1
            return False
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    # -- refcount blocks ---------------------------------------------------------------

    def check_refblocks(self) -> None:
        res, cs = self.res, self.cs
        for i, entry in enumerate(self.reftable):
            offset = entry & rc.REFT_OFFSET_MASK
            cluster = offset // cs
            if entry & rc.REFT_RESERVED:
                self._say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset % cs:
                self._say(f"ERROR refcount block {i} is not cluster aligned; refcount "
                          "table entry corrupted")
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= len(self.imrt):
                res.corruptions += 1
                fixing = self.calc_fix & FIX_ERRORS
                self._say(f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is "
                          "outside image")
                if fixing:
                    try:
                        if offset // cs >= MAX_CLUSTERS:
                            # qemu would grow the file to it; blockdrv rebuilds
                            # the refcount structure instead (as qemu does when
                            # the file system refuses the size)
                            raise OSError("File too large")
                        self.out.truncate(offset + cs)
                    except Exception as exc:  # noqa: BLE001
                        self.rebuild = True
                        self._say(f"ERROR could not resize image: {exc}")
                        continue
                    self._grow(-(-self._flen() // cs))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc(offset, cs)
                continue
            if offset:
                self.inc(offset, cs)
                if self.imrt[cluster] != 1:
                    self._say(f"ERROR refcount block {i} refcount={self.imrt[cluster]}")
                    res.corruptions += 1
                    self.rebuild = True

    def calculate(self) -> None:
        """qemu's calculate_refcounts: fill the in-memory table."""
        h, img = self.h, self.img
        self._grow(-(-self._flen() // self.cs))
        self.inc(0, self.cs)                                  # the header
        self.check_l1(h.l1_table_offset, h.l1_size, CHECK_FRAG_INFO, True)
        for sn in img.snapshots:
            if sn.l1_table_offset % self.cs:
                self._say(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset="
                          f"{_hash_x(sn.l1_table_offset)}: L1 table is not cluster "
                          "aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_BYTES // 8:
                self._say(f"ERROR snapshot {sn.id} ({sn.name}) l1_size="
                          f"{_hash_x(sn.l1_size)}: L1 table is too large; snapshot table "
                          "entry corrupted")
                self.res.corruptions += 1
                continue
            self.check_l1(sn.l1_table_offset, sn.l1_size, 0, False)
        self.inc(h.snapshots_offset, self._snapshots_size())
        self.inc(self.reftable_offset, len(self.reftable) * 8)
        self.check_bitmaps()
        self.check_refblocks()

    def check_bitmaps(self) -> None:
        """qemu's qcow2_check_bitmaps_refcounts: the directory, each bitmap
        table and the data clusters it names."""
        d, bitmaps = bm.load(self.img)
        if d is None:
            return
        self.inc(d.offset, d.size)
        if bitmaps is None:
            self.res.corruptions += 1
            raise CheckFailed("Invalid argument", self.res)
        for b in bitmaps:
            self.inc(b.table_offset, b.table_size * 8)
            for entry in self._read_table(b.table_offset, b.table_size):
                if not bm.entry_valid(entry, self.cs):
                    self.res.corruptions += 1
                    continue
                if entry & bm.TABLE_OFFSET_MASK:
                    self.inc(entry & bm.TABLE_OFFSET_MASK, self.cs)

    def _snapshots_size(self) -> int:
        h = self.h
        if not h.nb_snapshots:
            return 0
        bound = h.nb_snapshots * (40 + 1024 + 2 * 65535 + 7)
        buf = self._pread(h.snapshots_offset,
                          max(0, min(bound, self._flen() - h.snapshots_offset)))
        return parse_table(buf, h.nb_snapshots)[1]

    # -- on-disk refcounts --------------------------------------------------------------

    def _block(self, offset: int) -> bytearray:
        block = self._blocks.get(offset)
        if block is None:
            block = self._blocks[offset] = bytearray(self._pread(offset, self.cs))
        return block

    def disk_refcounts(self, start: int, n: int) -> list[int] | None:
        """On-disk refcounts of clusters ``start .. start+n-1`` (one refcount
        block at most); None when the block's offset is unusable."""
        t = start // self.per_block
        if t >= len(self.reftable):
            return [0] * n
        off = self.reftable[t] & rc.REFT_OFFSET_MASK
        if not off:
            return [0] * n
        if off % self.cs:
            return None
        values = self._decoded.get(off)
        if values is None:
            values = self._decoded[off] = rc.decode(self._block(off), self.order)
        first = start % self.per_block
        return values[first:first + n]

    def get_refcount(self, cluster: int) -> int | None:
        got = self.disk_refcounts(cluster, 1)
        return None if got is None else got[0]

    def compare(self, fix: int) -> int:
        """qemu's compare_refcounts; returns the highest cluster in use."""
        res, imrt = self.res, self.imrt
        highest = 0
        nb = len(imrt)
        i = 0
        while i < nb:
            n = min(nb - i, self.per_block - i % self.per_block)
            disk = self.disk_refcounts(i, n)
            if disk is not None and disk == imrt[i:i + n].tolist():
                # the common case, a whole block right: only the highest used
                for j in range(n - 1, -1, -1):
                    if disk[j]:
                        highest = i + j
                        break
                i += n
                continue
            for j in range(n):
                k = i + j
                if disk is None:
                    self._say(f"Can't get refcount for cluster {k}: Input/output error")
                    res.check_errors += 1
                    continue
                r1, r2 = disk[j], imrt[k]
                if r1 or r2:
                    highest = k
                if r1 == r2:
                    continue
                fixed = None
                if r1 == 0:
                    self.rebuild = True
                elif r1 > r2 and fix & FIX_LEAKS:
                    fixed = "leaks_fixed"
                elif r1 < r2 and fix & FIX_ERRORS:
                    fixed = "corruptions_fixed"
                what = "Repairing" if fixed else "ERROR" if r1 < r2 else "Leaked"
                self._say(f"{what} cluster {k} refcount={r1} reference={r2}")
                if fixed and self._set_refcount(k, r2):
                    setattr(res, fixed, getattr(res, fixed) + 1)
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
            i += n
        return highest

    def _set_refcount(self, cluster: int, value: int) -> bool:
        """Write one refcount in its (existing) on-disk block."""
        off = self.reftable[cluster // self.per_block] & rc.REFT_OFFSET_MASK
        if value > self.max_ref:
            return False
        block = self._block(off)
        rc.put(block, cluster % self.per_block, self.order, value)
        self._decoded.pop(off, None)
        self.out.pwrite(off, bytes(block))
        n = min(self.cs, self._flen() - cluster * self.cs)
        if not value and n > 0:
            # qemu discards a freed cluster in the file (a hole, reading as
            # zeros) whatever the discard option; a zero write that may
            # unmap does the same here
            self.out.pwrite_zeroes(cluster * self.cs, n, WRITE_UNMAP)
        return True

    # -- OFLAG_COPIED ---------------------------------------------------------------------

    def check_copied(self, fix: int) -> None:
        res, img, cs = self.res, self.img, self.cs
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            # safe only when the refcounts are now right
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        for i, l1e in enumerate(img.l1):
            l2_offset = l1e & L.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self.get_refcount(l2_offset // cs)
            if refcount is None:
                continue
            if (refcount == 1) != bool(l1e & L.OFLAG_COPIED):
                res.corruptions += 1
                self._say(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                          f"refcount={refcount}")
                if repair:
                    l1e = l1e | L.OFLAG_COPIED if refcount == 1 else l1e & ~L.OFLAG_COPIED
                    img.l1[i] = l1e
                    self.out.pwrite(self.h.l1_table_offset + i * 8, l1e.to_bytes(8, "big"))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = bytearray(self._pread(l2_offset, cs))
            dirty = 0
            for i, (entry, _) in enumerate(_entries(table, img.extl2)):
                if not entry or L.cluster_type(entry, img.extl2) not in (L.NORMAL,
                                                                         L.ZERO_ALLOC):
                    continue
                j = i * img.esize
                refcount = self.get_refcount((entry & L.L2E_OFFSET_MASK) // cs)
                if refcount is None:
                    continue
                if (refcount == 1) != bool(entry & L.OFLAG_COPIED):
                    res.corruptions += 1
                    self._say(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                              f"refcount={refcount}")
                    if repair:
                        entry = (entry | L.OFLAG_COPIED if refcount == 1
                                 else entry & ~L.OFLAG_COPIED)
                        table[j:j + 8] = entry.to_bytes(8, "big")
                        dirty += 1
            if dirty:
                self.out.pwrite(l2_offset, bytes(table))
                img.l2_cache.pop(l2_offset, None)
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    # -- rebuilding the refcount structure -------------------------------------------

    def _alloc_imrt(self, count: int, first_free: int) -> tuple[int, int]:
        """qemu's alloc_clusters_imrt: ``count`` free clusters from
        ``first_free`` on (growing the table at the end); returns (cluster,
        the first gap seen)."""
        imrt = self.imrt
        cluster, run, gap = first_free, 0, None
        while cluster < len(imrt) and run < count:
            if not imrt[cluster]:
                run += 1
                if gap is None:
                    gap = cluster
            else:
                run = 0
            cluster += 1
        if run < count:
            self._grow(cluster + count - run)
        start = cluster - run
        for k in range(start, start + count):
            imrt[k] = 1
        return start, first_free if gap is None else gap

    def _write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """Write the refcount blocks covering used clusters of ``[first,
        end)`` from the in-memory table, allocating them in it; returns whether
        ``reftable`` grew."""
        cs, per = self.cs, self.per_block
        grown = False
        first_free = 0
        cluster = first
        while cluster < end:
            if not self.imrt[cluster]:
                cluster += 1
                continue
            index = cluster // per
            start = index * per
            if index < len(reftable) and reftable[index]:
                block_off = reftable[index]
            else:
                first_free = max(first_free, start)
                block, first_free = self._alloc_imrt(1, first_free)
                block_off = block * cs
                end = max(end, block + 1)
                if index >= len(reftable):
                    entries = -(-(index + 1) * 8 // cs) * cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = block_off
            values = [self.imrt[k] if k < len(self.imrt) else 0
                      for k in range(start, start + per)]
            self._guard(block_off, cs, "ERROR writing refblock")
            self.out.pwrite(block_off, rc.encode(values, self.order, cs))
            cluster = start + per
        return grown

    def rebuild_structure(self) -> None:
        """qemu's rebuild_refcount_structure: new refcount blocks and table
        from the in-memory counts; the old ones are leaked (fixed after)."""
        cs = self.cs
        reftable: list[int] = []
        self._write_refblocks(0, len(self.imrt), reftable)
        while True:
            clusters = -(-len(reftable) * 8 // cs)
            start, _ = self._alloc_imrt(clusters, 0)
            if not self._write_refblocks(start, start + clusters, reftable):
                break
        self._guard(start * cs, len(reftable) * 8, "ERROR writing reftable")
        self.out.pwrite(start * cs, rc.pack_table(reftable))
        self.out.pwrite(_HEADER_REFTABLE, struct.pack(">QI", start * cs, clusters))
        self.out.flush()
        self.reftable_offset = start * cs
        self.reftable = reftable
        self._decoded.clear()
        # the open image's header now names the new table
        self.h.refcount_table_offset, self.h.refcount_table_clusters = start * cs, clusters
        self._blocks.clear()

    def _overlap(self, offset: int, size: int) -> str | None:
        """qemu's metadata overlap check (its default, "cached" set): which
        metadata the clusters of ``[offset, offset+size)`` would overwrite."""
        cs, h, img = self.cs, self.h, self.img
        if offset < cs:
            return "qcow2_header"
        start = offset - offset % cs
        end = -(-(offset + size) // cs) * cs

        def hits(off: int, n: int) -> bool:
            return n > 0 and off < end and start < off + n

        if h.l1_size and hits(h.l1_table_offset, h.l1_size * 8):
            return "active L1 table"
        if hits(h.refcount_table_offset, h.refcount_table_clusters * cs):
            return "refcount table"
        if hits(h.snapshots_offset, self._snapshots_size()):
            return "snapshot table"
        if any(sn.l1_size and hits(sn.l1_table_offset, sn.l1_size * 8)
               for sn in img.snapshots):
            return "inactive L1 table"
        if any(e & L.L1E_OFFSET_MASK and hits(e & L.L1E_OFFSET_MASK, cs) for e in img.l1):
            return "active L2 table"
        if any(e & rc.REFT_OFFSET_MASK and hits(e & rc.REFT_OFFSET_MASK, cs)
               for e in self.old_reftable):
            return "refcount block"
        d = bm.directory(h)
        if d is not None and hits(d.offset, d.size):
            return "bitmap directory"
        return None

    def _guard(self, offset: int, size: int, what: str) -> None:
        """Refuse a write over metadata as qemu does: mark the image corrupt
        and end the check."""
        name = self._overlap(offset, size)
        if name is None:
            return
        self._say("qcow2: Marking image as corrupt: Preventing invalid write on metadata "
                  f"(overlaps with {name}); further corruption events will be suppressed")
        self.corrupted = True
        if self.h.version >= 3:
            bits = self.h.incompatible_features | INCOMPAT_CORRUPT
            self.out.pwrite(72, bits.to_bytes(8, "big"))
            self.out.flush()
        self.res.check_errors += 1
        raise CheckFailed(f"{what}: Input/output error", self.res)

    # -- the whole check -----------------------------------------------------------------

    def run(self) -> CheckResult:
        res, fix = self.res, self.fix
        res.total_clusters = -(-self.h.size // self.cs)
        for name in ("allocated_clusters", "fragmented_clusters", "compressed_clusters"):
            setattr(res, name, 0)
        try:
            self._run()
        finally:
            if fix:
                self._forget()
        if fix and not res.check_errors and not res.corruptions:
            self.mark_clean(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        return res

    def _forget(self) -> None:
        """After repairs, the open image must not serve tables from before."""
        img = self.img
        img.l2_cache.clear()
        img.__dict__.pop("_refblocks", None)
        img._prealloc = None

    def _run(self) -> None:
        res, fix = self.res, self.fix
        self.calculate()
        before = _copy(res)
        highest = self.compare(0)
        if self.rebuild and fix & FIX_ERRORS:
            old = _copy(res)
            self._say("Rebuilding refcount structure")
            self.rebuild_structure()
            res.corruptions = res.leaks = 0
            self.rebuild = False
            self.imrt = array(self.typecode)
            self.calc_fix = 0
            self.calculate()
            fresh_leaks = 0
            if fix & FIX_LEAKS:
                # the old structure is now leaked: free it, keep only leaks
                # the rebuild could not free
                saved = _copy(res)
                self.res = CheckResult(messages=res.messages)
                highest = self.compare(FIX_LEAKS)
                if self.rebuild:
                    self._say("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = self.res.leaks
                self.res = res
                _restore(res, saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self._say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed("Input/output error", res)
            if res.leaks or res.corruptions:
                msgs = res.messages
                _restore(res, before)
                res.messages = msgs
                highest = self.compare(fix)
        self.check_copied(fix)
        res.image_end_offset = (highest + 1) * self.cs

    def mark_clean(self, bits: int = INCOMPAT_DIRTY) -> None:
        """qemu's mark_clean (and with INCOMPAT_CORRUPT, mark_consistent):
        clear the header's feature ``bits``."""
        h = self.h
        if h.version < 3 or self.corrupted or not h.incompatible_features & bits:
            return
        h.incompatible_features &= ~bits
        self.out.flush()
        self.out.pwrite(72, h.incompatible_features.to_bytes(8, "big"))
        self.out.flush()


def _entries(table: bytes, ext: bool):
    """(entry, subcluster bitmap) of every L2 entry of ``table``, decoded in
    one call: a Python step per entry was most of a short check's time."""
    words = struct.unpack(f">{len(table) // 8}Q", table)
    return zip(words[0::2], words[1::2]) if ext else zip(words, itertools.repeat(0))


def _hash_x(value: int) -> str:
    """C's %#x: no prefix for zero."""
    return f"{value:#x}" if value else "0"


def _copy(res: CheckResult) -> CheckResult:
    # a shallow copy (the messages list shared); not dataclasses.replace,
    # whose import (inspect, ast, dis...) costs every check ~15 ms
    import copy
    return copy.copy(res)


def _restore(res: CheckResult, saved: CheckResult) -> None:
    vars(res).update((k, v) for k, v in vars(saved).items() if k != "messages")


def check_image(img, fix: int = 0, out=None) -> CheckResult:
    """Check (and with ``fix``, repair through ``out``) the open image ``img``."""
    return Qcow2Check(img, fix, out).run()


def repair_dirty(img) -> CheckResult:
    """qemu's repair on a read-write open of a dirty image (lazy refcounts
    not written back): a check fixing errors and leaks, which clears the
    dirty bit.  The check's lines go to stderr as qemu's do; a repair that
    cannot finish refuses the open."""
    try:
        res = check_image(img, FIX_ERRORS | FIX_LEAKS)
    except CheckFailed as exc:
        _tell(exc.result.messages)
        # the step that failed gets a line of its own, the open's error
        # names the errno only (qemu's error_report, then its -errno)
        step, _, why = str(exc).rpartition(": ")
        if step:
            _tell([f"blockdrv: {step}: {why}"])
        raise BlockIOError(f"Could not repair dirty image: {why}") from None
    _tell(res.messages)
    if res.check_errors:
        raise BlockIOError("Could not repair dirty image: Input/output error")
    if img.dirty:
        # qemu would write on with the bit set; blockdrv's writer relies on
        # refcounts it can trust, so the open stops here
        raise BlockIOError(f"Could not repair dirty image: {res.corruptions} "
                           "corruptions remain")
    return res


def _tell(lines: list[str]) -> None:
    import sys
    for line in lines:
        print(line, file=sys.stderr)


def check_file(file, fix: int = 0, out=None) -> tuple[CheckResult, CheckResult | None]:
    """Check the qcow2 image in protocol node ``file`` and repair it through
    ``out`` (default ``file``, which must then be writable): the pass that
    repairs and, when it fixed anything, qemu-img's second pass."""
    from types import SimpleNamespace

    from .image import Qcow2Image

    img = Qcow2Image(SimpleNamespace(file=file))
    img.open(read_write=False)     # a corrupt image may be checked and repaired

    def one(fix: int) -> CheckResult:
        # both passes on the one open image, as qemu-img's double check
        chk = Qcow2Check(img, fix, out)
        try:
            return chk.run()
        finally:
            if fix:
                # closing a read-write qcow2 image clears its dirty bit
                chk.mark_clean()

    first = one(fix)
    if not (first.corruptions_fixed or first.leaks_fixed):
        return first, None
    return first, one(0)
