"""Writing a qcow2 image: guest writes, zero writes, discards, the dirty bit.

:class:`Qcow2Writer` is what a read-write open adds to a
:class:`.image.Qcow2Image`: the refcount allocator of :mod:`.alloc`
(qemu's placement policy, so the same requests leave the same file as
qemu 7.2) and the L2 side of :mod:`.cluster`.

Request level, as qemu's qcow2.c and block/io.c:

* a write asks ``alloc_host_offset`` for one host-contiguous run at a time,
  copies the unwritten head and tail of new clusters from what the guest
  read there before (backing file, zeros, a compressed or shared cluster),
  writes them with the data, then links the clusters into L2;
* a zero write is split at cluster boundaries; whole clusters get the zero
  flag (v3) or are discarded (v2 without a backing file), a partial cluster
  only when the rest of it already reads as zeros and it holds no data --
  everything else becomes a write of zeros, 16 MiB at a time;
* a discard acts on whole clusters only (and the partial last cluster of
  the image); v3 marks them zero, v2 unmaps them, and freed clusters are
  discarded in the image file too (qemu's pass-discard-request default).

Metadata caches, as qemu's qcow2-cache.c in writeback mode: changed L2
entries and refcount blocks stay in memory (``dirty_l2``, the allocator's
``dirty``) until the node is flushed or closed, or too many are dirty; then
:meth:`Qcow2Writer.writeback` writes the refcount blocks, flushes the file
(guest data and refcounts are stable before any L2 entry names them) and
writes the L2 entries.  Steps that must reach the disk in order (a new L2
table before its L1 entry, a new refcount block before its table entry, L2
entries cleared before the refcounts they held drop) call
:meth:`~Qcow2Writer.barrier`, which writes back everything first.  Under
cache=writethrough the generic layer flushes after every request, which
writes the caches back there and then.

With ``lazy_refcounts`` the dirty bit is set before the first L2 update of
the session and cleared, with a rewrite of the header, on a clean close.
"""

from __future__ import annotations

from blockdrv.coroutine import CoLock
from blockdrv.errors import CorruptImageError, UnsupportedError
from blockdrv.iov import IOVector

from . import l2 as L
from . import refcount as rc
from .alloc import Allocator
from .cluster import INT_MAX, ClusterMap
from .image import L2_CACHE_BYTES
from .constants import (AUTOCLEAR_KNOWN, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT,
                        EXT_FEATURE_TABLE, INCOMPAT_DIRTY)

MAX_TRANSFER = 32768 << 9      # qemu's MAX_BOUNCE_BUFFER: zero-write fallback chunks
_INCOMPAT_OFFSET = 72          # offsetof(QCowHeader, incompatible_features)
_REFTABLE_OFFSET = 48          # offsetof(QCowHeader, refcount_table_offset)
_KNOWN_EXTENSIONS = (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE)


def check_writable(img) -> None:
    """Refuse, with one line, what blockdrv cannot write the way qemu does."""
    h = img.h
    if h.incompatible_features & INCOMPAT_DIRTY:
        raise UnsupportedError("qcow2 image is dirty (lazy refcounts were not written "
                               "back): repair it with 'qemu-img check -r all' before "
                               "writing")
    unknown = [e.type for e in h.extensions if e.type not in _KNOWN_EXTENSIONS]
    if unknown:
        raise UnsupportedError(f"blockdrv cannot write qcow2 images with header extension "
                               f"{unknown[0]:#x}: open the image read-only")


class Qcow2Writer:
    def __init__(self, img, bs) -> None:
        check_writable(img)
        self.img, self.bs = img, bs
        h = img.h
        self.file = img.file
        self.lazy = bool(h.version >= 3 and h.compatible_features & COMPAT_LAZY_REFCOUNTS)
        raw = self._read(h.refcount_table_offset, h.refcount_table_clusters * img.cs)
        table = rc.parse_table(raw, len(raw) // 8)
        self.alloc = Allocator(h.cluster_bits, h.refcount_order, table,
                               h.refcount_table_offset, self._read, self._write,
                               self._set_table)
        self.alloc.on_zero = self._freed
        self.alloc.barrier = self.barrier
        self.alloc.writeback = True
        # L2 offset -> [table, first byte, end byte] changed since the last writeback
        self.dirty_l2: dict[int, list] = {}
        # dirty tables (and refcount blocks) before a writeback between requests,
        # so that the memory held stays near the L2 cache's bound
        self.max_dirty = max(16, L2_CACHE_BYTES // img.cs)
        self.map = ClusterMap(img, self)
        # where the next compressed piece may go (qemu's free_byte_offset):
        # inside a partly used host cluster, or 0
        self.free_byte_offset = 0
        self._discard_ok = False
        self._discards: list[list[int]] = []
        # One request changes metadata at a time (qemu's s->lock, held across
        # the whole request here: simpler than qemu's in-flight dependencies,
        # and the order of allocations stays that of the requests).
        self.lock = CoLock()
        self._metadata = self._metadata_clusters()
        if h.autoclear_features & ~AUTOCLEAR_KNOWN:
            # qemu clears autoclear bits it does not know on a read-write open
            h.autoclear_features &= AUTOCLEAR_KNOWN
            self.write_header()

    # -- raw metadata I/O --------------------------------------------------------------

    def _read(self, offset: int, n: int) -> bytes:
        # a refcount block past the end of a damaged file reads as zeros
        inside = max(0, min(n, self.file.total_size - offset))
        return bytes(self.file.pread(offset, inside)).ljust(n, b"\0") if inside else bytes(n)

    def _write(self, offset: int, data: bytes) -> None:
        self.file.pwrite(offset, data)

    def write_meta(self, offset: int, data: bytes) -> None:
        self.file.pwrite(offset, data)

    def write_l2(self, l2_off: int, table: bytearray, start: int, end: int) -> None:
        """Bytes ``start:end`` of an L2 table changed: written at the next writeback."""
        d = self.dirty_l2.get(l2_off)
        if d is None:
            self.dirty_l2[l2_off] = [table, start, end]
        else:
            d[0] = table
            d[1], d[2] = min(d[1], start), max(d[2], end)

    def writeback(self) -> None:
        """Write the cached metadata in qemu's dependency order: refcount
        blocks, a flush, then L2 entries (not flushed: that is the caller's)."""
        self.alloc.write_blocks()
        if self.dirty_l2:
            self.file.flush()
            for l2_off in sorted(self.dirty_l2):
                table, start, end = self.dirty_l2[l2_off]
                self.write_meta(l2_off + start, bytes(table[start:end]))
                del self.dirty_l2[l2_off]

    def maybe_writeback(self) -> None:
        """qemu's cache eviction, in bulk: bound what stays dirty."""
        if len(self.dirty_l2) + len(self.alloc.dirty) > self.max_dirty:
            self.writeback()

    def flush_refcounts(self) -> None:
        """Refcount blocks durable, L2 entries left cached (qemu's flush of
        its refcount cache alone).  Never behind the L2 cache: a refcount
        drops only after a barrier made the cleared entries durable."""
        self.alloc.write_blocks()
        self.file.flush()

    def barrier(self) -> None:
        """Order two metadata steps (qemu's cache dependency): what was
        changed so far is durable before the next step's writes."""
        self.writeback()
        self.file.flush()

    def _set_table(self, offset: int, clusters: int) -> None:
        # qemu's qcow2_refcount_area: the two header fields, synchronously
        h = self.img.h
        h.refcount_table_offset, h.refcount_table_clusters = offset, clusters
        self.barrier()
        self.write_meta(_REFTABLE_OFFSET, offset.to_bytes(8, "big")
                        + clusters.to_bytes(4, "big"))
        self.barrier()

    def write_l1_entry(self, l1i: int) -> None:
        """qemu's qcow2_write_l1_entry: the whole 512-byte sector of entries."""
        img = self.img
        first = l1i & ~63
        entries = img.l1[first:first + 64]
        data = b"".join(e.to_bytes(8, "big") for e in entries).ljust(512, b"\0")
        self.write_meta(img.h.l1_table_offset + first * 8, data)
        self.barrier()

    def write_header(self) -> None:
        self.write_meta(0, self.img.h.pack())
        self.barrier()

    # -- qemu's metadata overlap check ------------------------------------------------

    def _metadata_clusters(self) -> set[int]:
        """Clusters holding metadata other than refcount blocks: header, L1
        tables, L2 tables, refcount table, snapshot table.  In a damaged image
        (a refcount of zero on one of them) the allocator could hand one out;
        writing guest data there would destroy it."""
        img, cs = self.img, self.img.cs
        h = img.h

        def span(offset, nbytes):
            return range(offset // cs, -(-(offset + nbytes) // cs))
        out = {0, *span(h.l1_table_offset, h.l1_size * 8)}
        if h.nb_snapshots:
            out.add(h.snapshots_offset // cs)       # (its first cluster at least)
        for s in img.snapshots:
            out.update(span(s.l1_table_offset, s.l1_size * 8))
        out.update(L.l1_offset(e) // cs for e in img.l1 if L.l1_offset(e))
        return out

    def overlap_check(self, offset: int, nbytes: int) -> None:
        cs, h = self.img.cs, self.img.h
        first, last = offset // cs, (offset + nbytes - 1) // cs
        reft = range(h.refcount_table_offset // cs,
                     h.refcount_table_offset // cs + h.refcount_table_clusters)
        blocks = self.alloc.block_clusters()
        for c in range(first, last + 1):
            what = None
            if c in self._metadata:
                what = "active L1/L2 table, header or snapshot"
            elif c in reft:
                what = "refcount table"
            elif c in blocks:
                what = "refcount block"
            if what:
                raise CorruptImageError(f"Preventing invalid write on metadata (overlaps "
                                        f"with {what}); the image is damaged: run "
                                        f"'qemu-img check'")

    # -- refcounts ---------------------------------------------------------------------

    def free(self, offset: int, nbytes: int, discard: bool) -> None:
        self._discard_ok = discard
        try:
            self.alloc.free(offset, nbytes)
        finally:
            self._discard_ok = False

    def free_entry(self, entry: int, discard: bool) -> None:
        """qemu's qcow2_free_any_cluster."""
        kind = L.cluster_type(entry, self.img.extl2)
        if kind == L.COMPRESSED:
            desc = L.parse_compressed(entry, self.img.cbits)
            self.free(desc.offset, desc.size, discard)
        elif kind in (L.NORMAL, L.ZERO_ALLOC):
            host = entry & L.L2E_OFFSET_MASK
            if host % self.img.cs:
                raise CorruptImageError(f"Cannot free unaligned cluster {host:#x}")
            self.free(host, self.img.cs, discard)

    def _freed(self, cluster: int) -> None:
        if not self._discard_ok:
            return
        start = cluster << self.img.cbits
        if self._discards and self._discards[-1][1] == start:
            self._discards[-1][1] += self.img.cs
        else:
            self._discards.append([start, start + self.img.cs])

    def process_discards(self) -> None:
        """Discard freed clusters in the image file (holes read as zeros)."""
        pending, self._discards = self._discards, []
        for start, end in pending:
            try:
                self.file.pdiscard(start, end - start)
            except UnsupportedError:
                pass

    # -- the dirty bit -----------------------------------------------------------------

    def mark_dirty(self) -> None:
        h = self.img.h
        if h.incompatible_features & INCOMPAT_DIRTY:
            return
        self.barrier()
        value = h.incompatible_features | INCOMPAT_DIRTY
        self.write_meta(_INCOMPAT_OFFSET, value.to_bytes(8, "big"))
        self.barrier()
        h.incompatible_features = value

    def mark_clean(self) -> None:
        h = self.img.h
        if h.incompatible_features & INCOMPAT_DIRTY:
            self.barrier()
            h.incompatible_features &= ~INCOMPAT_DIRTY
            self.write_header()

    # -- guest writes ------------------------------------------------------------------

    async def writev(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        async with self.lock:
            await self._writev(offset, nbytes, qiov)

    async def _writev(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        done = 0
        while done < nbytes:
            cur = min(nbytes - done, INT_MAX)
            host, cur, metas = self.map.alloc_host_offset(offset + done, cur)
            await self._write_run(host, offset + done, cur, qiov.slice(done, cur), metas)
            done += cur
            self.maybe_writeback()

    async def _write_run(self, host: int, offset: int, nbytes: int, qiov: IOVector,
                         metas) -> None:
        self.overlap_check(host, nbytes)
        # copy-on-write: what the guest read there before the write
        cows = []
        for m in metas:
            for start, n in (m.cow_start, m.cow_end):
                if n:
                    buf = bytearray(n)
                    await self.img.readv(m.offset + start, n, IOVector.from_buffer(buf))
                    cows.append((m.alloc_offset + start, buf))
                    self.overlap_check(m.alloc_offset + start, n)
        await self.file.co_pwritev(host, nbytes, qiov)
        for where, buf in cows:
            await self.file.co_pwrite(where, buf)
        if not metas:
            return
        # the data and copies reach the disk before the L2 entries: the
        # writeback flushes the file before it writes any L2 entry
        if self.lazy:
            self.mark_dirty()
        for m in reversed(metas):         # qemu's list is last-in first
            self.map.link(m)

    # -- zero writes (block/io.c's bdrv_co_do_pwrite_zeroes over qcow2's) ---------------

    async def pwrite_zeroes(self, offset: int, nbytes: int, unmap: bool,
                            no_fallback: bool) -> None:
        async with self.lock:
            await self._pwrite_zeroes(offset, nbytes, unmap, no_fallback)

    async def _pwrite_zeroes(self, offset: int, nbytes: int, unmap: bool,
                             no_fallback: bool) -> None:
        align = self.img.sub_size
        head = offset % align
        tail = (offset + nbytes) % align
        while nbytes > 0:
            num = nbytes
            if head:
                num = min(nbytes, MAX_TRANSFER, align - head)
                head = (head + num) % align
            elif tail and num > align:
                num -= tail
            try:
                await self._zero_piece(offset, num, unmap)
            except UnsupportedError:
                if no_fallback:
                    raise
                num = min(num, MAX_TRANSFER)
                zeros = bytearray(num)
                await self._writev(offset, num, IOVector.from_buffer(zeros))
            offset += num
            nbytes -= num
            self.maybe_writeback()

    async def _zero_piece(self, offset: int, nbytes: int, unmap: bool) -> None:
        """qemu's qcow2_co_pwrite_zeroes; UnsupportedError = write zeros."""
        img = self.img
        sub = img.sub_size
        head = offset % sub
        tail = -(-(offset + nbytes) // sub) * sub - (offset + nbytes)
        if offset + nbytes == img.h.size:
            tail = 0
        if head or tail:
            if not (await self._is_zero(offset - head, head)
                    and await self._is_zero(offset + nbytes, tail)):
                raise UnsupportedError("partial cluster holds data")
            offset -= head
            nbytes = sub
            kind, _, _ = img.lookup(offset, 1)
            if kind not in (L.UNALLOCATED, L.UNALLOCATED_ALLOC, L.ZERO_PLAIN, L.ZERO_ALLOC):
                raise UnsupportedError("partial cluster is allocated")
        if img.h.version < 3:
            if self.bs.backing is None:
                self.discard_clusters(offset, nbytes)
                return
            raise UnsupportedError("no zero flag in qcow2 v2")
        # qemu's qcow2_subcluster_zeroize: partial clusters (subclusters of
        # an extended L2 entry) at either end, whole clusters between
        cs, end = img.cs, offset + nbytes
        head = min(end, -(-offset // cs) * cs) - offset
        offset += head
        tail = 0 if end >= img.h.size else end - max(offset, end // cs * cs)
        end -= tail
        if head:
            self.map.zero_subclusters(offset - head, -(-head // sub))
        if end > offset:
            self.map.zeroize(offset, end - offset, unmap)
        if tail:
            self.map.zero_subclusters(end, -(-tail // sub))

    async def _is_zero(self, offset: int, nbytes: int) -> bool:
        from blockdrv.mapping import co_block_status
        from blockdrv.common import BLOCK_ZERO
        size = self.img.h.size
        nbytes = min(nbytes, size - offset)
        if nbytes <= 0:
            return True
        while nbytes > 0:
            st = await co_block_status(self.bs, offset, nbytes)
            if not st.flags & BLOCK_ZERO or st.pnum <= 0:
                return False
            offset += st.pnum
            nbytes -= st.pnum
        return True

    # -- discards (qcow2_co_pdiscard) ---------------------------------------------------

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        async with self.lock:
            self._pdiscard(offset, nbytes)

    def _pdiscard(self, offset: int, nbytes: int) -> None:
        img = self.img
        if img.h.version < 3 and self.bs.backing is not None:
            return              # would expose the backing file's stale data
        cs = img.cs
        end = offset + nbytes
        first = -(-offset // cs) * cs
        last = end // cs * cs
        # the partial last cluster of an image whose size is not cluster aligned
        if end == img.h.size and end % cs and last >= first:
            last = end
        if last > first:
            self.discard_clusters(first, last - first)

    def discard_clusters(self, offset: int, nbytes: int) -> None:
        self.map.discard(offset, nbytes)

    # -- flush and close ---------------------------------------------------------------

    def flush(self) -> None:
        """Write the caches back; the generic layer then flushes the file."""
        self.writeback()

    def close(self) -> None:
        self.barrier()
        self.mark_clean()
