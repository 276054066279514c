"""blockdrv-vpc: the VHD (``vpc``) format driver for blockdrv, as qemu 7.2's.

A separate distribution: it imports only :mod:`blockdrv.driver` and is found
through its entry point ``blockdrv.drivers: vpc``.
"""

from __future__ import annotations

from blockdrv.driver import DriverInfo, hookimpl

from .create import CREATE_OPTS, create_vpc
from .image import VPCImage
from .structs import (DISK_TYPE_NAMES, FOOTER_COOKIE, VHD_EPOCH, creator_name)

__all__ = ["VPCFormat", "driver"]


class VPCFormat:
    format_name = "vpc"
    protocol_name = None
    create_opts = CREATE_OPTS

    @hookimpl
    def bdrv_probe(self, buf, filename) -> int:
        # as qemu: only the footer copy at offset 0, so a fixed VHD (footer at
        # the end only) probes as raw
        return 100 if bytes(buf[:8]) == FOOTER_COOKIE else 0

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        img = VPCImage(bs)
        img.open(options or {})
        bs.opaque = img
        bs.total_size = img.total_size
        bs.request_alignment = 1

    @hookimpl
    def bdrv_close(self, bs) -> None:
        bs.opaque = None

    @hookimpl
    def bdrv_reopen_prepare(self, bs, flags) -> None:
        return None

    @hookimpl
    def bdrv_reopen_commit(self, bs, flags) -> None:
        return None

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov) -> None:
        await bs.opaque.readv(offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov, flags) -> None:
        await bs.opaque.writev(offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes):
        return bs.opaque.block_status(offset, nbytes)

    @hookimpl
    def bdrv_get_info(self, bs) -> DriverInfo:
        img: VPCImage = bs.opaque
        f = img.footer
        spec = {
            "creator": creator_name(f.creator_app),
            "creator-app": f.creator_app.decode("latin-1"),
            "creator-version": f"{f.creator_major}.{f.creator_minor}",
            "creator-os": f.creator_os.decode("latin-1"),
            "disk-type": DISK_TYPE_NAMES.get(f.disk_type, str(f.disk_type)),
            "uuid": _uuid_text(f.uuid),
            "timestamp": f.timestamp + VHD_EPOCH,
            "current-size": f.current_size,
            "geometry": f"{f.cylinders}/{f.heads}/{f.sectors}",
        }
        return DriverInfo(cluster_size=0 if img.fixed else img.block_size,
                          format_specific={"type": "vpc", "data": spec})

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        if bs.opaque.fixed:
            return bs.file.has_zero_init()
        return True

    @hookimpl
    def bdrv_create(self, filename, options) -> None:
        create_vpc(filename, options)


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


driver = VPCFormat()
