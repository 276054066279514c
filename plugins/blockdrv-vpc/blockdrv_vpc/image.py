"""An open VHD: validation at open (qemu 7.2's rules and messages), reads,
allocating writes and block status."""

from __future__ import annotations

import errno
import struct
import sys

from blockdrv.driver import (BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_RECURSE, BLOCK_ZERO,
                             BlockStatus, CorruptImageError, InvalidArgumentError,
                             IOVector, UnsupportedError)

from .structs import (DISK_DIFFERENCING, DISK_FIXED, DYN_COOKIE,
                      DYN_HEADER_SIZE, FOOTER_COOKIE, FOOTER_SIZE, F_CHECKSUM, MAX_GEOMETRY,
                      MAX_SECTORS, SECTOR, SIZE_FROM_FOOTER, UNALLOCATED, DynHeader, Footer,
                      bitmap_size, checksum)

SIZE_CALC_MODES = ("none", "chs", "current_size")


class _Lock:
    """Serialises allocations.  Synchronous callers never contend (one request
    runs to completion at a time); under an event loop it is an asyncio.Lock."""

    def __init__(self) -> None:
        self._aio = None
        self._held = False

    async def __aenter__(self) -> None:
        aio = sys.modules.get("asyncio")
        loop = aio._get_running_loop() if aio is not None else None
        if loop is None:
            if self._held:
                raise RuntimeError("vpc allocation lock contended outside an event loop")
            self._held = True
            return
        if self._aio is None:
            self._aio = aio.Lock()
        await self._aio.acquire()

    async def __aexit__(self, *exc) -> None:
        if self._held:
            self._held = False
        else:
            self._aio.release()


def _be32s(buf: bytes) -> list[int]:
    return list(struct.unpack(f">{len(buf) // 4}I", buf))


class VPCImage:
    """State of one open image (qemu's BDRVVPCState)."""

    def __init__(self, bs) -> None:
        self.bs = bs
        self.file = bs.file
        self.footer: Footer | None = None
        self.footer_buf = b""            # as read: what every footer rewrite writes
        self.footer_at_head = False
        self.header: DynHeader | None = None
        self.bat: list[int] = []
        self.block_size = 0
        self.bitmap_size = 0
        self.bat_offset = 0
        self.free_offset = 0             # where the next block goes (the tail footer)
        self.total_size = 0
        self.bitmap_ok: set[int] = set()  # blocks whose bitmap is known all-ones
        self.lock = _Lock()

    # -- open ------------------------------------------------------------

    @property
    def fixed(self) -> bool:
        # qemu decides the I/O path by the type field, the parsing by where
        # the footer was found.
        return self.footer.disk_type == DISK_FIXED

    def open(self, options: dict) -> None:
        mode = options.get("force_size_calc") or "none"
        if mode not in SIZE_CALC_MODES:
            raise InvalidArgumentError(f"Invalid size calculation mode: '{mode}'")
        # qemu's bdrv_getlength: the file's length in whole sectors
        flen = -(-self.file.total_size // SECTOR) * SECTOR
        head = bytes(self.file.pread(0, FOOTER_SIZE)) if flen else bytes(FOOTER_SIZE)
        head = head.ljust(FOOTER_SIZE, b"\0")
        if head[:8] == FOOTER_COOKIE:
            buf, self.footer_at_head = head, True
        else:
            if flen < FOOTER_SIZE:
                raise InvalidArgumentError("File too small for a VHD header")
            buf = bytes(self.file.pread(flen - FOOTER_SIZE, FOOTER_SIZE))
            if buf[:8] != FOOTER_COOKIE:
                raise CorruptImageError("invalid VPC image")
        footer = Footer.unpack(buf)
        if checksum(buf, F_CHECKSUM) != footer.checksum:
            raise CorruptImageError("Incorrect header checksum")
        if footer.disk_type == DISK_DIFFERENCING:
            # qemu 7.2 opens these as if dynamic and reads zeros where the
            # parent's data belongs; refuse rather than show a wrong disk.
            raise UnsupportedError(
                "VHD differencing images (disk type 4) are not supported: the data of "
                "unallocated blocks is in the parent image; convert the chain to a "
                "single image with a tool that reads VHD chains (e.g. Hyper-V's "
                "Merge-VHD) first")
        self.footer, self.footer_buf = footer, buf

        sectors = footer.chs_sectors
        use_chs = footer.creator_app not in SIZE_FROM_FOOTER or mode == "chs"
        if not use_chs or sectors == MAX_GEOMETRY or mode == "current_size":
            sectors = footer.current_size // SECTOR
        if sectors > MAX_SECTORS:
            raise InvalidArgumentError("File too large", errno=errno.EFBIG)
        self.total_size = sectors * SECTOR

        if self.footer_at_head:
            self._open_dynamic(flen)

    def _open_dynamic(self, flen: int) -> None:
        hdr_at = self.footer.data_offset
        if hdr_at + DYN_HEADER_SIZE > 1 << 63:
            # beyond any request qemu's block layer accepts (a 0-byte fixed
            # image, whose only footer is at offset 0, ends up here in qemu too)
            raise CorruptImageError("Error reading dynamic VHD header")
        # past the end of the file reads as zeros, as in qemu
        inside = max(0, min(DYN_HEADER_SIZE, flen - hdr_at))
        buf = bytes(self.file.pread(hdr_at, inside)) if inside else b""
        buf = buf.ljust(DYN_HEADER_SIZE, b"\0")
        hdr = DynHeader.unpack(buf)
        if hdr.cookie != DYN_COOKIE:
            raise CorruptImageError("Invalid header magic")
        bsz = hdr.block_size
        if bsz < SECTOR or bsz & (bsz - 1):
            raise CorruptImageError(f"Invalid block size {bsz}")
        if self.total_size // bsz > 0xFFFFFFFF:
            raise CorruptImageError("Too many blocks")
        entries = hdr.max_table_entries
        if entries * bsz < self.total_size:
            raise CorruptImageError("Page table too small")
        if entries > 0x7FFFFFFF // 4:
            raise CorruptImageError(f"Max Table Entries too large ({entries})")
        self.header = hdr
        self.block_size = bsz
        self.bitmap_size = bitmap_size(bsz)
        self.bat_offset = hdr.table_offset
        nbytes = entries * 4
        free = -(-(self.bat_offset + nbytes) // SECTOR) * SECTOR
        if free > flen:
            # qemu reads the missing part as zeros and ends up here too
            raise CorruptImageError("block-vpc: free_data_block_offset points after the "
                                    "end of file. The image has been truncated.")
        self.bat = _be32s(bytes(self.file.pread(self.bat_offset, nbytes))) if nbytes else []
        span = self.bitmap_size + bsz
        for entry in self.bat:
            if entry != UNALLOCATED:
                free = max(free, entry * SECTOR + span)
        if free > flen:
            raise CorruptImageError("block-vpc: free_data_block_offset points after the "
                                    "end of file. The image has been truncated.")
        self.free_offset = free

    # -- mapping -----------------------------------------------------------

    def host_offset(self, offset: int) -> int | None:
        index = offset // self.block_size
        if index >= len(self.bat) or self.bat[index] == UNALLOCATED:
            return None
        return self.bat[index] * SECTOR + self.bitmap_size + offset % self.block_size

    # -- reads ---------------------------------------------------------------

    async def readv(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        if self.fixed:
            await self.file.co_preadv(offset, nbytes, qiov)
            return
        done = 0
        while done < nbytes:
            pos = offset + done
            n = min(nbytes - done, self.block_size - pos % self.block_size)
            host = self.host_offset(pos)
            part = qiov.slice(done, n)
            if host is None:
                part.memset(0, n)
            else:
                await self.file.co_preadv(host, n, part)
            done += n

    # -- writes --------------------------------------------------------------

    async def writev(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        if self.fixed:
            await self.file.co_pwritev(offset, nbytes, qiov)
            return
        done = 0
        while done < nbytes:
            pos = offset + done
            n = min(nbytes - done, self.block_size - pos % self.block_size)
            part = qiov.slice(done, n)
            index = pos // self.block_size
            if self.host_offset(pos) is None:
                async with self.lock:
                    if self.host_offset(pos) is None:
                        await self._allocate(index, pos % self.block_size, n, part)
                        done += n
                        continue
            await self._ensure_bitmap(index)
            await self.file.co_pwritev(self.host_offset(pos), n, part)
            done += n

    async def _ensure_bitmap(self, index: int) -> None:
        """qemu marks every sector of a block it writes to as present (it never
        reads the bitmap); do the same, but only write when it is not so already."""
        if index in self.bitmap_ok:
            return
        at = self.bat[index] * SECTOR
        cur = await self.file.co_pread(at, self.bitmap_size)
        if cur.count(0xFF) != self.bitmap_size:
            await self.file.co_pwrite(at, b"\xff" * self.bitmap_size)
            await self.file.co_flush()
        self.bitmap_ok.add(index)

    async def _allocate(self, index: int, start: int, n: int, data: IOVector) -> None:
        """Allocate block ``index`` at the end of the file with the guest's
        ``n`` bytes at ``start`` in it.

        The resulting bytes are qemu's (bitmap, data, footer after the block,
        BAT entry) but the order makes every prefix of it a readable image:

        1. the new footer after the new block, flushed (the file now ends in a
           footer again; the old one, where the block starts, is still intact),
        2. zeros over the rest of the block, but only where an earlier
           interrupted allocation may have left stale bytes,
        3. the guest data, 4. the bitmap (over the old footer), then a flush,
        5. the BAT entry -- only now can the block be seen, and everything it
           points at is durable.  The entry itself is made durable by the
           guest's next flush, as the data of any other write.
        """
        base = self.free_offset
        data_at = base + self.bitmap_size
        end = data_at + self.block_size
        old_len = self.file.total_size
        await self.file.co_pwrite(end, self.footer_buf)
        # the file must end in a footer whatever part of what follows lands
        await self.file.co_flush()
        if old_len > base + FOOTER_SIZE:
            for lo, hi in ((data_at, data_at + start), (data_at + start + n, end)):
                hi = min(hi, old_len)
                if hi > lo:
                    await self.file.co_pwrite_zeroes(lo, hi - lo)
        await self.file.co_pwritev(data_at + start, n, data)
        await self.file.co_pwrite(base, b"\xff" * self.bitmap_size)
        await self.file.co_flush()
        await self.file.co_pwrite(self.bat_offset + 4 * index, struct.pack(">I", base // SECTOR))
        self.bat[index] = base // SECTOR
        self.free_offset = end
        self.bitmap_ok.add(index)

    # -- block status ----------------------------------------------------------

    def block_status(self, offset: int, nbytes: int) -> BlockStatus:
        if self.fixed:
            # qemu-img map shows a fixed image's host holes as data *and* zero
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID | BLOCK_RECURSE, nbytes,
                               offset, self.file)
        bsz = self.block_size
        host = self.host_offset(offset)
        n = min(nbytes, bsz - offset % bsz)
        if host is not None:
            # whole allocated blocks are data, as qemu reports them (no look at
            # the host file's holes, no bitmap)
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, n, host, self.file)
        while n < nbytes and self.host_offset(offset + n) is None:
            n = min(nbytes, n + bsz)
        return BlockStatus(BLOCK_ZERO, n)
