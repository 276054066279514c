"""The ``raw`` format: guest bytes are file bytes.

Probes with score 1, so it is only chosen when no other format claims an
image (and the CLI then warns that it guessed).  A *probed* raw node guards
its first sector as qemu's raw-format.c does: a write that would make it
probe as another format is refused with EPERM, since the next open would
then trust the guest's bytes as image metadata (a guest writing a qcow2
header naming /etc/shadow as its backing file, say).
"""

from __future__ import annotations

import errno

from ...block import create_file
from ...errors import InvalidArgumentError, ReadOnlyError
from ...hookspecs import hookimpl
from ...common import BLOCK_OFFSET_VALID, BLOCK_RAW, FILE_PREALLOC_MODES, BlockStatus, DriverInfo
from ...options import CreateOption

SECTOR = 512


def _round_sector(n: int) -> int:
    # QEMU keeps sizes in 512-byte sectors: a 1001-byte raw file is a 1024-byte
    # disk (reads past EOF are zeros, writes extend the file), and qemu-img
    # create rounds the size up the same way.
    return -(-n // SECTOR) * SECTOR


class RawFormat:
    format_name = "raw"
    protocol_name = None

    create_opts = [
        CreateOption("size", "size", "Virtual disk size"),
        CreateOption("preallocation", "string",
                     "Preallocation mode (allowed values: off, falloc, full)"),
    ]

    @hookimpl
    def bdrv_probe(self, buf, filename) -> int:
        return 1

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        bs.total_size = _round_sector(bs.file.total_size)
        bs.request_alignment = bs.file.request_alignment
        if bs.probed_raw:
            # As raw_refresh_limits: sub-sector writes go through the generic
            # read-modify-write, so the guard below always sees the whole
            # first sector as it would land on disk.
            bs.request_alignment = max(bs.request_alignment, SECTOR)

    @hookimpl
    def bdrv_child_perm(self, bs, perm, shared) -> tuple[int, int]:
        # A filter of its file (QEMU's raw-format without offset/size): it
        # keeps no metadata, so it takes and shares just what its user does.
        return perm, shared

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov) -> None:
        await bs.file.co_preadv(offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov, flags) -> None:
        if bs.probed_raw and offset < SECTOR and nbytes:
            _guard_block0(bs, qiov)
        await bs.file.co_pwritev(offset, nbytes, qiov, flags)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs, offset, nbytes, flags) -> None:
        await bs.file.co_pwrite_zeroes(offset, nbytes, flags)

    @hookimpl
    async def bdrv_co_pdiscard(self, bs, offset, nbytes) -> None:
        await bs.file.co_pdiscard(offset, nbytes)

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        # QEMU's raw: "ask my file, same offset".  The generic layer answers
        # for the file, and reads the sector-rounded tail past a file whose
        # length is not a sector multiple as zeros, a hole as qemu reports it.
        return BlockStatus(BLOCK_RAW | BLOCK_OFFSET_VALID, nbytes, offset, bs.file)

    @hookimpl
    async def bdrv_co_truncate(self, bs, offset, exact, prealloc) -> None:
        await bs.file.co_truncate(offset, exact, prealloc)
        bs.total_size = _round_sector(offset)

    @hookimpl
    def bdrv_get_info(self, bs) -> DriverInfo:
        return DriverInfo()

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        return bs.file.has_zero_init()

    @hookimpl
    def bdrv_measure(self, options, in_bs, size) -> dict:
        # As qemu's raw_measure: the file is the disk, every byte of it
        # (a sparse host file may use less; nothing in the format says so).
        if in_bs is not None:
            size = in_bs.total_size
        size = _round_sector(size or 0)
        return {"required": size, "fully-allocated": size}

    @hookimpl
    def bdrv_create(self, filename, options) -> None:
        size = _round_sector(options.get("size", 0))   # file-posix rounds up to sectors
        prealloc = options.get("preallocation") or "off"
        if prealloc not in FILE_PREALLOC_MODES:
            raise InvalidArgumentError(f"invalid parameter value: {prealloc}")
        file_bs = create_file(filename)
        try:
            file_bs.truncate(size, prealloc=prealloc)
        finally:        # close() flushes
            file_bs.close()


def _guard_block0(bs, qiov) -> None:
    """Refuse a write whose first sector would probe as a non-raw format.

    Only data writes are checked, as in qemu: write-zeroes and discard leave
    zeros, and zeros probe as raw.  (A sub-sector zero write is done as a
    data write of the merged sector, so it is checked too.)
    """
    from ...plugins import get_registry
    from ...probe import probe_format_name
    name = probe_format_name(get_registry(), qiov.slice(0, SECTOR).to_bytes())
    if name != "raw":
        raise ReadOnlyError(
            f"Writing this to block 0 would make the probed raw image look like "
            f"{name or 'an unknown format'}; open it with format raw to allow it",
            errno=errno.EPERM)


driver = RawFormat()
