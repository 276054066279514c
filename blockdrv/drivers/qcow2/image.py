"""An open qcow2 image: validation at open, the cluster map, reads, block status.

Writes are :mod:`.write`'s (a read-write open attaches a writer).  L1 is loaded
whole (bounded by qemu's 32 MiB cap); L2 tables go through a small LRU
cache bounded in bytes.
"""

from __future__ import annotations

import struct

from blockdrv.driver import (BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_RECURSE, BLOCK_ZERO,
                             BlockStatus, CorruptImageError, InvalidArgumentError,
                             UnsupportedError)

from . import l2 as L
from . import refcount as rc
from .constants import (COMPRESSION_NAMES, COMPRESSION_ZSTD, COMPAT_LAZY_REFCOUNTS,
                        INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
                        INCOMPAT_EXTL2, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
                        MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE)
from .header import Header
from .snapshot import Snapshot, parse_table

L2_CACHE_BYTES = 4 << 20
_MAX_ENTRY = 40 + 1024 + 2 * 65535 + 7      # a snapshot entry, padded
_HOSTED = (L.NORMAL, L.ZERO_ALLOC, L.UNALLOCATED_ALLOC)   # kinds with a host offset


def _table(offset: int, entries: int, entry_len: int, max_bytes: int, name: str,
           cluster_size: int) -> None:
    """qemu's qcow2_validate_table."""
    if entries * entry_len > max_bytes:
        raise InvalidArgumentError(f"{name} too large")
    if offset % cluster_size or offset + entries * entry_len > (1 << 63) - 1:
        raise InvalidArgumentError(f"{name} offset invalid")


class Qcow2Image:
    def __init__(self, bs) -> None:
        self.bs = bs
        self.file = bs.file
        # L2 tables by offset, least recently used first (a dict keeps its
        # insertion order: a hit moves the table to the end)
        self.l2_cache: dict[int, bytes] = {}
        self.snapshots: list[Snapshot] = []
        self._prealloc: bool | None = None
        self.writer = None          # a .write.Qcow2Writer while open read-write

    # -- open ------------------------------------------------------------------------

    def open(self, read_write: bool) -> None:
        f = self.file
        head = bytes(f.pread(0, min(f.total_size, 1 << MAX_CLUSTER_BITS)))
        h = self.h = Header.parse(head)
        cs = self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        if h.crypt_method:
            raise UnsupportedError("Encrypted qcow2 images are not supported by blockdrv "
                                   f"(encryption method {h.crypt_method})")
        if h.incompatible_features & INCOMPAT_DATA_FILE or h.data_file:
            raise UnsupportedError("qcow2 images with an external data file are not "
                                   "supported by blockdrv")
        if h.incompatible_features & INCOMPAT_CORRUPT and read_write:
            raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write")
        self.extl2 = bool(h.incompatible_features & INCOMPAT_EXTL2)
        self.esize = L.l2_entry_size(self.extl2)
        self.l2_entries = cs // self.esize
        self.sub_size = cs // L.SUBCLUSTERS if self.extl2 else cs
        _table(h.refcount_table_offset, h.refcount_table_clusters, cs, MAX_REFTABLE_BYTES,
               "Reference count table", cs)
        _table(h.snapshots_offset, h.nb_snapshots, 40, 40 * MAX_SNAPSHOTS,
               "Snapshot table", cs)
        _table(h.l1_table_offset, h.l1_size, 8, MAX_L1_BYTES, "Active L1 table", cs)
        need = -(-h.size // (cs * self.l2_entries))
        if h.l1_size < need:
            raise InvalidArgumentError("L1 table is too small")
        # qemu would read a table past the end of the file as zeros; a header
        # naming one is damaged, and refusing it keeps a few bytes of header
        # from making us allocate up to the caps above
        for name, offset, nbytes in (
                ("Reference count table", h.refcount_table_offset,
                 h.refcount_table_clusters * cs),
                ("Snapshot table", h.snapshots_offset, h.nb_snapshots * 40),
                ("Active L1 table", h.l1_table_offset, h.l1_size * 8)):
            if nbytes and offset + nbytes > f.total_size:
                raise CorruptImageError(f"{name} extends beyond the end of the file")
        raw = bytes(f.pread(h.l1_table_offset, h.l1_size * 8)) if h.l1_size else b""
        raw = raw.ljust(h.l1_size * 8, b"\0")       # a short read from a protocol
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        self._read_snapshots()

    def _read_snapshots(self) -> None:
        h = self.h
        if not h.nb_snapshots:
            return
        # Entries are at most 40 + 1024 + 2 * 65535 bytes and qemu refuses a
        # table beyond MAX_SNAPSHOTS_SIZE: read what the file holds, never
        # more than those bounds allow.
        bound = min(h.nb_snapshots * _MAX_ENTRY, MAX_SNAPSHOTS_SIZE + _MAX_ENTRY)
        n = max(0, min(bound, self.file.total_size - h.snapshots_offset))
        buf = bytes(self.file.pread(h.snapshots_offset, n))
        self.snapshots, _ = parse_table(buf, h.nb_snapshots)

    # -- the cluster map --------------------------------------------------------------

    def _l2(self, l2_offset: int) -> bytes:
        table = self.l2_cache.get(l2_offset)
        if table is None and self.writer is not None:
            # a table evicted with changes not yet written back
            dirty = self.writer.dirty_l2.get(l2_offset)
            if dirty is not None:
                table = self.l2_cache[l2_offset] = dirty[0]
        if table is None:
            if l2_offset % self.cs:
                raise CorruptImageError(f"L2 table offset {l2_offset:#x} unaligned")
            table = bytes(self.file.pread(l2_offset, self.cs)).ljust(self.cs, b"\0")
            self.l2_cache[l2_offset] = table
            while len(self.l2_cache) * self.cs > max(L2_CACHE_BYTES, 2 * self.cs):
                del self.l2_cache[next(iter(self.l2_cache))]
        else:
            self.l2_cache[l2_offset] = self.l2_cache.pop(l2_offset)
        return table

    def lookup(self, offset: int, nbytes: int) -> tuple[int, int, int]:
        """(kind, host offset of ``offset``, bytes) for a run from ``offset``
        of one kind (and contiguous host offsets), within one L2 table."""
        cs, sub = self.cs, self.sub_size
        l2_span = cs * self.l2_entries
        l1i = offset // l2_span
        end = min(offset + nbytes, (l1i + 1) * l2_span)
        l2_off = L.l1_offset(self.l1[l1i]) if l1i < len(self.l1) else 0
        if not l2_off:
            return L.UNALLOCATED, 0, end - offset
        table = self._l2(l2_off)
        kind, host = self._entry(table, offset)
        pos = (offset // sub + 1) * sub
        if not self.extl2 and kind != L.COMPRESSED and pos < end:
            pos += self._same_entries(table, offset, end, kind in _HOSTED) * cs
        while pos < end:
            k2, h2 = self._entry(table, pos)
            if k2 != kind or kind == L.COMPRESSED:
                break
            if kind in _HOSTED and h2 != host + pos - offset:
                break
            pos += sub
        return kind, host, min(pos, end) - offset

    def _same_entries(self, table: bytes, offset: int, end: int, hosted: bool) -> int:
        """How many entries after ``offset``'s, before ``end``, continue its
        run word for word: the same entry, or for a hosted kind the entry
        of the next host cluster.  One unpack and integer compares, where
        the cluster-by-cluster walk below decodes every entry (``map`` of a
        1 GiB image: 16,384 of them).  Anything else is left to that walk."""
        cs = self.cs
        i = (offset // cs) % self.l2_entries
        count = (end - 1) // cs - offset // cs      # clusters after offset's, before end
        if count <= 0:
            return 0
        first = int.from_bytes(table[i * 8:i * 8 + 8], "big")
        step = cs if hosted else 0
        if hosted:
            # the offset field must not carry into the flag bits
            count = min(count, (L.L2E_OFFSET_MASK - (first & L.L2E_OFFSET_MASK)) // cs)
        # unpacked in growing pieces: callers ask up to the table's end,
        # runs are often short (a convert asks again after every run)
        done, piece, want = 0, 32, first + step
        while done < count:
            n = min(piece, count - done)
            for word in struct.unpack_from(f">{n}Q", table, (i + 1 + done) * 8):
                if word != want:
                    return done
                done += 1
                want += step
            piece *= 4
        return done

    def _entry(self, table: bytes, offset: int) -> tuple[int, int]:
        """Kind and host offset of guest byte ``offset`` (in its table)."""
        cs = self.cs
        i = (offset // cs) % self.l2_entries
        entry = int.from_bytes(table[i * self.esize:i * self.esize + 8], "big")
        in_cluster = offset % cs
        if self.extl2:
            bitmap = int.from_bytes(table[i * 16 + 8:i * 16 + 16], "big")
            kind = L.subcluster_type(entry, bitmap, in_cluster // self.sub_size)
        else:
            kind = L.cluster_type(entry, False)
        if kind == L.INVALID:
            raise CorruptImageError(f"Invalid cluster entry found (L2 offset: "
                                    f"{offset // cs * cs:#x}, L2 index: {i:#x})")
        if kind == L.COMPRESSED:
            return kind, entry
        host = entry & L.L2E_OFFSET_MASK
        if kind in _HOSTED:
            if host % cs:
                raise CorruptImageError(f"Cluster allocation offset {host:#x} unaligned "
                                        f"(L2 offset: {offset // cs * cs:#x}, L2 index: "
                                        f"{i:#x})")
            return kind, host + in_cluster
        return kind, 0

    # -- reads ---------------------------------------------------------------------------

    async def readv(self, offset: int, nbytes: int, qiov) -> None:
        done = 0
        while done < nbytes:
            kind, host, n = self.lookup(offset + done, nbytes - done)
            part = qiov.slice(done, n)
            if kind == L.NORMAL:
                await self.file.co_preadv(host, n, part)
            elif kind in (L.ZERO_PLAIN, L.ZERO_ALLOC):
                part.memset(0, n)
            elif kind in (L.UNALLOCATED, L.UNALLOCATED_ALLOC):
                await self.bs.co_read_backing(offset + done, n, part)
            else:
                data = await self._decompress(host)
                start = (offset + done) % self.cs
                part.scatter(0, data[start:start + n])
            done += n

    async def _decompress(self, entry: int) -> bytes:
        desc = L.parse_compressed(entry, self.cbits)
        raw = bytes(await self.file.co_pread(desc.offset, desc.size))
        if self.h.compression_type == COMPRESSION_ZSTD:
            return _zstd(raw, self.cs)
        import zlib                 # compressed clusters only
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(raw, self.cs)
        except zlib.error:
            out = b""
        if len(out) != self.cs:
            raise CorruptImageError("Could not decompress a compressed cluster")
        return out

    # -- block status ------------------------------------------------------------------

    def block_status(self, offset: int, nbytes: int) -> BlockStatus:
        """qemu's qcow2_co_block_status."""
        kind, host, n = self.lookup(offset, nbytes)
        flags = 0
        if kind in (L.ZERO_PLAIN, L.ZERO_ALLOC):
            flags |= BLOCK_ZERO
        elif kind not in (L.UNALLOCATED, L.UNALLOCATED_ALLOC):
            flags |= BLOCK_DATA
        if kind in _HOSTED:
            flags |= BLOCK_OFFSET_VALID
            if flags & BLOCK_DATA and self.metadata_preallocated():
                flags |= BLOCK_RECURSE
            return BlockStatus(flags, n, host, self.file)
        return BlockStatus(flags, n)

    def metadata_preallocated(self) -> bool:
        """qemu's qcow2_detect_metadata_preallocation: far more clusters in use
        than the host file really stores."""
        if self._prealloc is None:
            try:
                real = self.file.get_allocated_file_size() // self.cs
            except Exception:
                real = 0
            threshold = max(real * 10 // 9, real + 2)
            end = -(-self.file.total_size // self.cs)
            self._prealloc = self._in_use(end, threshold) > threshold
        return self._prealloc

    def _in_use(self, end: int, limit: int) -> int:
        """Clusters below ``end`` with a refcount, counted until past
        ``limit``: one read of the refcount table and one per refcount
        block (``map`` of a large image asks this for every extent)."""
        writer = getattr(self, "writer", None)
        if writer is not None:              # the allocator's current view
            count = 0
            for i in range(end):
                if count > limit:
                    break
                count += bool(writer.alloc.refcount(i))
            return count
        h = self.h
        per = rc.entries_per_block(self.cs, h.refcount_order)
        entries = min(-(-end // per), h.refcount_table_clusters * self.cs // 8)
        inside = max(0, min(entries * 8, self.file.total_size - h.refcount_table_offset))
        raw = bytes(self.file.pread(h.refcount_table_offset, inside)) if inside else b""
        table = rc.parse_table(raw.ljust(entries * 8, b"\0"), entries)
        count = 0
        for t, entry in enumerate(table):
            if count > limit:
                break
            block_off = entry & rc.REFT_OFFSET_MASK
            if block_off:
                values = rc.decode(self._refblock(block_off), h.refcount_order)
                n = min(per, end - t * per)
                count += n - values[:n].count(0)
        return count

    def refcount(self, index: int) -> int:
        writer = getattr(self, "writer", None)
        if writer is not None:
            return writer.alloc.refcount(index)     # the allocator's current view
        h = self.h
        per = rc.entries_per_block(self.cs, h.refcount_order)
        t = index // per
        if t >= h.refcount_table_clusters * self.cs // 8:
            return 0
        entry = int.from_bytes(self.file.pread(h.refcount_table_offset + t * 8, 8), "big")
        block_off = entry & rc.REFT_OFFSET_MASK
        if not block_off:
            return 0
        block = self._refblock(block_off)
        return rc.get(block, index % per, h.refcount_order)

    def _refblock(self, offset: int) -> bytes:
        cache = self.__dict__.setdefault("_refblocks", {})
        if offset not in cache:
            if len(cache) > 16:
                cache.clear()
            cache[offset] = bytes(self.file.pread(offset, self.cs)).ljust(self.cs, b"\0")
        return cache[offset]

    # -- info ----------------------------------------------------------------------------

    def format_specific(self) -> dict:
        h = self.h
        if h.version == 2:
            return {"compat": "0.10", "compression-type": "zlib",
                    "refcount-bits": h.refcount_bits}
        return {"compat": "1.1", "compression-type": COMPRESSION_NAMES[h.compression_type],
                "lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": h.refcount_bits,
                "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
                "extended-l2": self.extl2}

    @property
    def dirty(self) -> bool:
        return bool(self.h.incompatible_features & INCOMPAT_DIRTY)


def _zstd(raw: bytes, cluster_size: int) -> bytes:
    # qemu stores one zstd frame per cluster.  The library is imported here,
    # on the first zstd cluster, not at open.
    try:
        import zstandard
    except ImportError:
        raise UnsupportedError("This image has zstd-compressed clusters; reading them "
                               "needs the 'zstandard' package") from None
    # Fed in small pieces, so that a hostile frame expanding to gigabytes is
    # caught after a few MiB; the frame must end exactly at the cluster's end
    # (qemu fails a frame that is not finished once the cluster is full).
    # What follows the frame is padding or the next cluster's data.
    d = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    try:
        for pos in range(0, len(raw), 128):
            out += d.decompress(raw[pos:pos + 128])
            if d.eof or len(out) > cluster_size:
                break
    except zstandard.ZstdError:
        out = bytearray()
    if not d.eof:
        out = bytearray()
    if len(out) != cluster_size:
        raise CorruptImageError("Could not decompress a compressed cluster")
    return bytes(out)
