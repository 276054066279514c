"""The qcow2 format driver (docs/interop/qcow2.txt), hook implementations.

One module per on-disk structure: :mod:`.header` (header and extensions),
:mod:`.l2` (L1/L2 entries, extended L2, compressed descriptors),
:mod:`.refcount` (refcount table and blocks), :mod:`.snapshot` (the
snapshot table); :mod:`.alloc` is qemu's cluster allocation policy,
:mod:`.create` makes images byte for byte as qemu-img 7.2, :mod:`.image`
opens and reads them, :mod:`.write` (with :mod:`.cluster`, the L2 side)
writes them as qemu 7.2 does, extended L2 entries (subclusters) included;
:mod:`.compress` writes compressed clusters; a read-write open of a dirty
image repairs it first (:mod:`.check`), as qemu's open does.
"""

from __future__ import annotations

from blockdrv.driver import (O_CHECK, O_RDWR, O_UNMAP, WRITE_NO_FALLBACK, WRITE_UNMAP,
                             BlockStatus, DriverInfo, SnapshotInfo, hookimpl)

from .constants import MAGIC
from .create import CREATE_OPTS

class Qcow2Format:
    format_name = "qcow2"
    protocol_name = None
    create_opts = CREATE_OPTS

    @hookimpl
    def bdrv_probe(self, buf, filename) -> int:
        # qemu's qcow2_probe: the magic and a version of 2 or more
        if bytes(buf[:4]) == MAGIC and int.from_bytes(bytes(buf[4:8]), "big") >= 2:
            return 100
        return 0

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        from .image import Qcow2Image
        img = Qcow2Image(bs)
        img.open(read_write=bool(flags & O_RDWR))
        if flags & O_RDWR:
            if img.dirty:
                if flags & O_CHECK:
                    # `check` reports the damage and repairs only with -r; the
                    # writer comes once a repair has cleared the dirty bit
                    bs.opaque = img
                    _describe(bs, img)
                    return
                from .check import repair_dirty
                repair_dirty(img)
            # built after any repair: the allocator reads the repaired refcounts
            from .write import Qcow2Writer
            img.writer = Qcow2Writer(img, bs)
        bs.opaque = img
        _describe(bs, img)

    @hookimpl
    def bdrv_close(self, bs) -> None:
        img = bs.opaque
        bs.opaque = None
        if img is not None and img.writer is not None:
            img.writer.close()              # qemu's qcow2_inactivate: mark clean
        elif img is not None and bs.open_flags & O_RDWR and img.dirty:
            # opened for `check -r`, dirty still (a repair that failed or
            # fixed leaks only): qemu's close clears the bit all the same,
            # unless the check marked the image corrupt (qemu then drops
            # the driver, and nothing more is written)
            from .check import Qcow2Check
            from .constants import INCOMPAT_CORRUPT
            if not int.from_bytes(bytes(img.file.pread(72, 8)), "big") & INCOMPAT_CORRUPT:
                Qcow2Check(img).mark_clean()

    @hookimpl
    def bdrv_reopen_prepare(self, bs, flags) -> None:
        img = bs.opaque
        if flags & O_RDWR:
            from .write import check_writable
            check_writable(img)
        elif img.writer is not None:
            # while the file is still writable (qemu marks clean in prepare)
            img.writer.close()

    @hookimpl
    def bdrv_reopen_commit(self, bs, flags) -> None:
        img = bs.opaque
        if flags & O_RDWR and img.writer is None:
            from .write import Qcow2Writer
            img.writer = Qcow2Writer(img, bs)
        elif not flags & O_RDWR:
            img.writer = None

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov) -> None:
        await bs.opaque.readv(offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov, flags) -> None:
        await bs.opaque.writer.writev(offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_pwritev_compressed(self, bs, offset, nbytes, qiov) -> None:
        from .compress import write_compressed
        await write_compressed(bs.opaque.writer, offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs, offset, nbytes, flags) -> None:
        # as block/io.c: no unmapping unless the node passes discards down
        unmap = bool(flags & WRITE_UNMAP and bs.open_flags & O_UNMAP)
        await bs.opaque.writer.pwrite_zeroes(offset, nbytes, unmap,
                                             bool(flags & WRITE_NO_FALLBACK))

    @hookimpl
    async def bdrv_co_pdiscard(self, bs, offset, nbytes) -> None:
        await bs.opaque.writer.pdiscard(offset, nbytes)

    @hookimpl
    async def bdrv_co_flush(self, bs) -> None:
        img = bs.opaque
        if img.writer is not None:
            img.writer.flush()
        else:                           # a dirty image opened for `check -r`
            img.file.flush()

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        # a new image reads as zeros where its backing file does
        return bs.backing is None

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        return bs.opaque.block_status(offset, nbytes)

    @hookimpl
    def bdrv_get_info(self, bs) -> DriverInfo:
        from .bitmaps import load
        img = bs.opaque
        spec = img.format_specific()
        bitmaps = load(img)[1]
        if bitmaps:
            spec["bitmaps"] = [b.info() for b in bitmaps]
        return DriverInfo(cluster_size=img.cs, is_dirty=img.dirty, format_specific=spec)

    @hookimpl
    def bdrv_check(self, bs, fix):
        from .check import check_image
        img = bs.opaque
        if img.writer is not None:
            img.writer.barrier()        # the check reads the file: no cached changes
        res = check_image(img, fix)
        if bs.open_flags & O_RDWR and img.writer is None and not img.dirty:
            # a dirty image opened for `check -r` is writable once repaired
            from .write import Qcow2Writer
            img.writer = Qcow2Writer(img, bs)
        return res

    @hookimpl
    def bdrv_measure(self, options, in_bs, size):
        from .measure import measure
        return measure(options, in_bs, size)

    @hookimpl
    def bdrv_snapshot_list(self, bs) -> list[SnapshotInfo]:
        return [snap.info() for snap in bs.opaque.snapshots]

    @hookimpl
    def bdrv_create(self, filename, options) -> None:
        from .create import create_qcow2
        create_qcow2(filename, options)


def _describe(bs, img) -> None:
    """What the node learns from the header: size and backing file."""
    bs.total_size = img.h.size
    bs.request_alignment = 1
    if img.h.backing_file:
        bs.backing_file = img.h.backing_file
        bs.backing_format = img.h.backing_format
        from blockdrv.block import path_combine
        bs.full_backing_file = path_combine(bs.filename, img.h.backing_file)


driver = Qcow2Format()
