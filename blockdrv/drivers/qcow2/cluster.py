"""The L2 side of writes (qemu's qcow2-cluster.c policy, qemu 7.2).

:class:`ClusterMap` finds or makes the L2 table of a guest offset
(``get_cluster_table``: an L1 entry without the COPIED flag gets a fresh
table, copied from the shared one or zeroed, written before the L1 entry
names it), plans where a write goes (``alloc_host_offset``: clusters that
can be overwritten in place, then new clusters, as one host-contiguous run)
and changes entries (``link``, ``discard``, ``zeroize``).

Changed entries wait in the writer's cache (see :mod:`.write`), which reaches
the disk in the order that keeps a crash harmless: a refcount increase before
the L2 entry that uses the cluster (the writeback's order), an L2 entry
cleared before the refcount it held drops (a barrier: written back and
flushed before the refcount changes), so a volatile disk cache cannot
reorder them.  Leaks are possible, corruption is not.

Extended L2 entries (subclusters) as qemu: a new allocation copies only the
subclusters around the write that were allocated before (plain unallocated
or zero subclusters keep their state), the written ones are marked
allocated in the bitmap; zero writes and discards set bitmap zero bits.
"""

from __future__ import annotations

from blockdrv.errors import CorruptImageError

from . import l2 as L

INT_MAX = (1 << 31) - 1
REQUEST_MAX = INT_MAX & ~511        # qemu's BDRV_REQUEST_MAX_BYTES (rounded)
_STOP = object()


class L2Meta:
    """One run of clusters whose L2 entries a write changes (qemu's QCowL2Meta).

    A plain class, not a dataclass: this module is on the path of every
    write, and ``dataclasses`` costs a short command ~15 ms of imports."""
    __slots__ = ("alloc_offset", "offset", "nb_clusters", "keep_old", "cow_start", "cow_end")

    def __init__(self, alloc_offset: int, offset: int, nb_clusters: int, keep_old: bool,
                 cow_start: tuple[int, int], cow_end: tuple[int, int]) -> None:
        self.alloc_offset = alloc_offset    # host offset of the first cluster
        self.offset = offset                # guest offset of the first cluster
        self.nb_clusters = nb_clusters
        self.keep_old = keep_old            # overwritten in place (zero/unallocated subclusters)
        self.cow_start = cow_start          # (offset in the run, bytes) copied before the data
        self.cow_end = cow_end              # (offset in the run, bytes) copied after it


def _alloc_kind(entry: int, ext: bool) -> bool:
    """qemu's cluster_needs_new_alloc: True unless the cluster can be written
    in place (a NORMAL or ZERO_ALLOC cluster with the COPIED flag)."""
    kind = L.cluster_type(entry, ext)
    if kind in (L.NORMAL, L.ZERO_ALLOC):
        return not entry & L.OFLAG_COPIED
    return True


def _ctz32(x: int) -> int:
    return (x & -x).bit_length() - 1 if x else 32


def _clz32(x: int) -> int:
    return 32 - x.bit_length()


ALL_ZEROES = 0xFFFFFFFF << 32           # every subcluster reads as zeros


class ClusterMap:
    def __init__(self, img, writer) -> None:
        self.img, self.w = img, writer
        self.cs, self.cbits = img.cs, img.cbits
        self.per_l2 = img.l2_entries
        self.ext, self.es = img.extl2, img.esize
        self.sub = img.sub_size
        self.sub_bits = self.sub.bit_length() - 1

    # -- tables -----------------------------------------------------------------------

    def _get(self, table, i: int) -> int:
        return int.from_bytes(table[i * self.es:i * self.es + 8], "big")

    def _bitmap(self, table, i: int) -> int:
        if not self.ext:
            return 0
        return int.from_bytes(table[i * 16 + 8:i * 16 + 16], "big")

    def _put(self, table, i: int, value: int, bitmap: int | None = None) -> None:
        table[i * self.es:i * self.es + 8] = value.to_bytes(8, "big")
        if self.ext and bitmap is not None:
            table[i * 16 + 8:i * 16 + 16] = bitmap.to_bytes(8, "big")

    def _sub_kind(self, table, i: int, sc: int) -> int:
        entry = self._get(table, i)
        if self.ext:
            return L.subcluster_type(entry, self._bitmap(table, i), sc)
        return L.cluster_type(entry, False)

    def _write_entries(self, l2_off: int, table, first: int, last: int) -> None:
        """Entries ``first..last`` (inclusive) of a table changed."""
        self.w.write_l2(l2_off, table, first * self.es, (last + 1) * self.es)

    def table(self, offset: int) -> tuple[int, bytearray]:
        """qemu's get_cluster_table: (L2 offset, table) for guest ``offset``,
        allocating the table when the L1 entry is not COPIED."""
        img = self.img
        l1i = offset // (self.cs * self.per_l2)
        if l1i >= len(img.l1):
            raise CorruptImageError("L1 index out of range")
        entry = img.l1[l1i]
        l2_off = L.l1_offset(entry)
        if l2_off % self.cs:
            raise CorruptImageError(f"L2 table offset {l2_off:#x} unaligned "
                                    f"(L1 index: {l1i:#x})")
        if not entry & L.OFLAG_COPIED:
            new = self._l2_allocate(l1i, l2_off)
            if l2_off:
                # the shared table loses this reference (snapshots)
                self.w.free(l2_off, self.cs, discard=False)
            l2_off = new
        return l2_off, self._table(l2_off)

    def _table(self, l2_off: int) -> bytearray:
        table = self.img._l2(l2_off)
        if not isinstance(table, bytearray):
            table = bytearray(table)
            self.img.l2_cache[l2_off] = table
        return table

    def _l2_allocate(self, l1i: int, old_off: int) -> int:
        """qemu's l2_allocate: refcount, then the table, then the L1 entry."""
        img, cs = self.img, self.cs
        new = self.w.alloc.alloc(cs)
        self.w.overlap_check(new, cs)
        self.w._metadata.add(new // cs)
        self.w.flush_refcounts()
        table = bytearray(self.img._l2(old_off)) if old_off else bytearray(cs)
        img.l2_cache[new] = table
        # written with every other changed table (qemu flushes its whole L2
        # cache here), durable before the L1 entry names it
        self.w.write_l2(new, table, 0, cs)
        self.w.barrier()
        img.l1[l1i] = new | L.OFLAG_COPIED
        self.w.write_l1_entry(l1i)
        return new

    # -- planning a write (qcow2_alloc_host_offset) ----------------------------------

    def alloc_host_offset(self, offset: int, nbytes: int) -> tuple[int, int, list[L2Meta]]:
        """Host offset for guest ``offset`` and how many bytes from there are
        host-contiguous (at most ``nbytes``); new clusters are allocated and
        described by the returned metas, which :meth:`link` must complete."""
        start, remaining = offset, nbytes
        host = None            # host offset of ``start`` once fixed
        first_host = None
        metas: list[L2Meta] = []
        while remaining:
            got = self._handle_copied(start, host, remaining, metas)
            if got is None:
                got = self._handle_alloc(start, host, remaining, metas)
            if got is None or got is _STOP:
                break
            h, n = got
            if first_host is None:
                first_host = h
            start += n
            remaining -= n
            host = h + n
        return first_host, nbytes - remaining, metas

    def _span(self, offset: int, nbytes: int) -> int:
        """Clusters from ``offset`` the request touches, within one L2 table."""
        in_cluster = offset % self.cs
        n = -(-(in_cluster + nbytes) // self.cs)
        l2i = (offset >> self.cbits) % self.per_l2
        return min(n, self.per_l2 - l2i, REQUEST_MAX >> self.cbits)

    def _handle_copied(self, offset, host, nbytes, metas):
        cs = self.cs
        n = self._span(offset, nbytes)
        _, table = self.table(offset)
        l2i = (offset >> self.cbits) % self.per_l2
        entry = self._get(table, l2i)
        if _alloc_kind(entry, self.ext):
            return None
        cluster = entry & L.L2E_OFFSET_MASK
        if cluster % cs:
            what = "Preallocated zero" if entry & L.OFLAG_ZERO else "Data"
            raise CorruptImageError(f"{what} cluster offset {cluster:#x} unaligned "
                                    f"(guest offset: {offset:#x})")
        if host is not None and cluster + offset % cs != host:
            return _STOP            # in place, but not where the run continues
        keep = 0
        expect = cluster
        while keep < n:
            e = self._get(table, l2i + keep)
            if _alloc_kind(e, self.ext) or e & L.L2E_OFFSET_MASK != expect:
                break
            keep += 1
            expect += cs
        count = min(nbytes, keep * cs - offset % cs)
        self._meta(cluster, offset, count, table, metas, keep_old=True)
        return cluster + offset % cs, count

    def _handle_alloc(self, offset, host, nbytes, metas):
        cs = self.cs
        n = self._span(offset, nbytes)
        _, table = self.table(offset)
        l2i = (offset >> self.cbits) % self.per_l2
        count = 0
        while count < n and _alloc_kind(self._get(table, l2i + count), self.ext):
            count += 1
        if count == 0:
            raise CorruptImageError("no cluster to allocate")
        if host is None:
            cluster = self.w.alloc.alloc(count * cs)
        else:
            cluster = host - host % cs
            count = self.w.alloc.alloc_at(cluster, count)
            if count == 0:
                return None
        in_cluster = offset % cs
        avail = count * cs
        got = min(nbytes, min(nbytes + in_cluster, avail) - in_cluster)
        self._meta(cluster, offset, got, table, metas, keep_old=False)
        return cluster + in_cluster, got

    def _meta(self, cluster, offset, nbytes, table, metas, keep_old) -> None:
        """qemu's calculate_l2_meta: which bytes around the write to copy."""
        cs, sub, sb = self.cs, self.sub, self.sub_bits
        l2i = (offset >> self.cbits) % self.per_l2
        start_to = offset % cs
        end_from = start_to + nbytes
        n = -(-end_from // cs)
        skip = keep_old
        for i in range(n):
            lo = max(start_to, i * cs) - i * cs
            hi = min(end_from, (i + 1) * cs) - i * cs
            kinds = {self._sub_kind(table, l2i + i, sc)
                     for sc in range(lo >> sb, ((hi - 1) >> sb) + 1)} if skip else \
                {self._sub_kind(table, l2i + i, 0)}
            if L.INVALID in kinds:
                raise CorruptImageError("Invalid cluster entry found (L2 index: "
                                        f"{l2i + i:#x})")
            if skip and kinds != {L.NORMAL}:
                skip = False
        if skip:
            return                          # plain overwrite: no metadata change
        sc = start_to >> sb
        first = self._sub_kind(table, l2i, sc)
        alloc_bits = self._bitmap(table, l2i) & 0xFFFFFFFF
        if not keep_old:
            if first in (L.NORMAL, L.ZERO_ALLOC, L.UNALLOCATED_ALLOC):
                start_from = min(sc, _ctz32(alloc_bits)) << sb if self.ext else 0
            elif first == L.COMPRESSED:
                start_from = 0
            else:                           # plain zero or unallocated
                start_from = sc << sb
        else:
            start_from = start_to if first == L.NORMAL else sc << sb
        last_i = l2i + n - 1
        sc = ((end_from - 1) % cs) >> sb
        last = self._sub_kind(table, last_i, sc)
        alloc_bits = self._bitmap(table, last_i) & 0xFFFFFFFF
        if not keep_old:
            if last in (L.NORMAL, L.ZERO_ALLOC, L.UNALLOCATED_ALLOC):
                end_to = -(-end_from // cs) * cs
                if self.ext:
                    end_to -= min(31 - sc, _clz32(alloc_bits)) << sb
            elif last == L.COMPRESSED:
                end_to = -(-end_from // cs) * cs
            else:
                end_to = -(-end_from // sub) * sub
        else:
            end_to = end_from if last == L.NORMAL else -(-end_from // sub) * sub
        metas.append(L2Meta(cluster, offset - start_to, n, keep_old,
                            (start_from, start_to - start_from),
                            (end_from, end_to - end_from)))

    # -- completing a write (qcow2_alloc_cluster_link_l2) ----------------------------

    def _holds_cluster(self, entry: int) -> bool:
        """Whether freeing the entry drops a refcount (so the cleared entry
        must reach the disk first); a zero or unallocated one frees nothing."""
        return L.cluster_type(entry, self.ext) in (L.NORMAL, L.ZERO_ALLOC, L.COMPRESSED)

    def link(self, m: L2Meta) -> None:
        l2_off, table = self.table(m.offset)
        l2i = (m.offset >> self.cbits) % self.per_l2
        old = []
        cs, sb = self.cs, self.sub_bits
        written_from = m.cow_start[0]
        written_to = m.cow_end[0] + m.cow_end[1]
        for i in range(m.nb_clusters):
            e = self._get(table, l2i + i)
            if e:
                old.append(e)
            bitmap = None
            if self.ext:
                lo = max(written_from, i * cs) - i * cs
                hi = min(written_to, (i + 1) * cs) - i * cs
                first, count = lo >> sb, ((hi - 1) >> sb) - (lo >> sb) + 1
                bitmap = self._bitmap(table, l2i + i)
                bitmap |= L.alloc_range_bitmap(first, count)
                bitmap &= ~L.zero_range_bitmap(first, count)
            self._put(table, l2i + i, (m.alloc_offset + i * cs) | L.OFLAG_COPIED, bitmap)
        self._write_entries(l2_off, table, l2i, l2i + m.nb_clusters - 1)
        if not m.keep_old and any(map(self._holds_cluster, old)):
            self.w.barrier()
            for e in old:
                self.w.free_entry(e, discard=False)

    # -- zero flags and discards -------------------------------------------------------

    def discard(self, offset: int, nbytes: int, *, full: bool = False) -> None:
        """qemu's qcow2_cluster_discard (``offset`` cluster aligned; the end
        aligned or the image's end)."""
        n = -(-nbytes // self.cs)
        has_backing = self.img.bs.backing is not None
        v3 = self.img.h.version >= 3
        ext = self.ext

        def new_entry(old, bitmap):
            kind = L.cluster_type(old, ext)
            if full:
                return 0, 0, True
            if has_backing or kind in (L.NORMAL, L.COMPRESSED, L.ZERO_ALLOC):
                if ext:
                    return 0, ALL_ZEROES, True
                return (L.OFLAG_ZERO if v3 else 0), 0, True
            return old, bitmap, False
        self._rewrite(offset, n, new_entry)

    def zeroize(self, offset: int, nbytes: int, unmap: bool) -> None:
        """qemu's zero_in_l2_slice over whole clusters (v3): the zero flag
        (bitmap zero bits); compressed clusters, and with ``unmap`` allocated
        ones, are freed."""
        n = -(-nbytes // self.cs)
        ext = self.ext

        def new_entry(old, bitmap):
            kind = L.cluster_type(old, ext)
            drop = kind == L.COMPRESSED or (unmap and kind in
                                            (L.NORMAL, L.COMPRESSED, L.ZERO_ALLOC))
            entry = 0 if drop else old
            if ext:
                return entry, ALL_ZEROES, drop
            return entry | L.OFLAG_ZERO, 0, drop
        self._rewrite(offset, n, new_entry)

    def zero_subclusters(self, offset: int, count: int) -> None:
        """qemu's zero_l2_subclusters: ``count`` subclusters of one cluster
        from ``offset`` read as zeros (no host cluster is freed)."""
        l2_off, table = self.table(offset)
        l2i = (offset >> self.cbits) % self.per_l2
        entry = self._get(table, l2i)
        kind = L.cluster_type(entry, True)
        if kind == L.COMPRESSED:
            from blockdrv.errors import UnsupportedError
            raise UnsupportedError("cannot zero part of a compressed cluster")
        first = (offset % self.cs) >> self.sub_bits
        old = self._bitmap(table, l2i)
        bitmap = (old | L.zero_range_bitmap(first, count)) & ~L.alloc_range_bitmap(first,
                                                                                  count)
        if bitmap != old:
            self._put(table, l2i, entry, bitmap)
            self._write_entries(l2_off, table, l2i, l2i)

    def _rewrite(self, offset, n, new_entry) -> None:
        """Change the entries of ``n`` clusters from ``offset``, table by
        table: entries first, then (after a barrier) the refcounts they held."""
        while n > 0:
            l2_off, table = self.table(offset)
            l2i = (offset >> self.cbits) % self.per_l2
            count = min(n, self.per_l2 - l2i)
            changed, old_entries = [], []
            for i in range(count):
                old = self._get(table, l2i + i)
                old_bitmap = self._bitmap(table, l2i + i)
                new, bitmap, free = new_entry(old, old_bitmap)
                if new == old and bitmap == old_bitmap:
                    continue
                self._put(table, l2i + i, new, bitmap)
                changed.append(l2i + i)
                if free:
                    old_entries.append(old)
            if changed:
                self._write_entries(l2_off, table, changed[0], changed[-1])
            if any(map(self._holds_cluster, old_entries)):
                self.w.barrier()
                for old in old_entries:
                    self.w.free_entry(old, discard=True)   # a guest request
            self.w.process_discards()
            self.w.maybe_writeback()       # a zero write over a huge image: bounded
            n -= count
            offset += count * self.cs
