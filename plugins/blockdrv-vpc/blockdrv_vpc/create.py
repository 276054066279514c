"""Creating images as qemu-img 7.2 does (``-o subformat=dynamic|fixed,
force_size=on|off``), plus the Azure rounding of fixed force_size images."""

from __future__ import annotations

import errno
import sys
import time
import uuid as _uuid

from blockdrv.driver import CreateOption, InvalidArgumentError, create_file, parse_bool

from .structs import (BAT_OFFSET, DEFAULT_BLOCK_SIZE, DISK_DYNAMIC, DISK_FIXED,
                      FOOTER_SIZE, MAX_GEOMETRY, MAX_SECTORS, NO_OFFSET, SECTOR, VHD_EPOCH,
                      CHS_MAX_C, CHS_MAX_H, CHS_MAX_S, DynHeader, Footer, geometry_covering)

MiB = 1 << 20

CREATE_OPTS = [
    CreateOption("size", "size", "Virtual disk size"),
    CreateOption("subformat", "string",
                 "Type of virtual hard disk format. Supported formats are "
                 "{dynamic (default) | fixed} "),
    CreateOption("force_size", "bool",
                 "Force disk size calculation to use the actual size specified, "
                 "rather than using the nearest CHS-based calculation"),
]


class Plan:
    """Everything ``create`` will write, decided before the first byte."""

    def __init__(self, size: int, subformat: str | None, force_size) -> None:
        subformat = subformat or "dynamic"
        if subformat not in ("dynamic", "fixed"):
            raise InvalidArgumentError(f"Invalid subformat '{subformat}'")
        force = parse_bool(force_size) if isinstance(force_size, str) else bool(force_size)
        self.disk_type = DISK_FIXED if subformat == "fixed" else DISK_DYNAMIC
        self.note = None
        size = -(-size // SECTOR) * SECTOR          # qemu-img rounds up to sectors silently
        if force and self.disk_type == DISK_FIXED and size % MiB:
            # Beyond qemu: Azure takes only fixed VHDs whose size is a whole
            # number of MiB; force_size=on + fixed is how one asks for one.
            rounded = -(-size // MiB) * MiB
            self.note = (f"vpc: virtual size {size} rounded up to {rounded} bytes "
                         f"(a multiple of 1 MiB, as Azure requires)")
            size = rounded
        if force:
            chs = (CHS_MAX_C, CHS_MAX_H, CHS_MAX_S)
        else:
            chs = geometry_covering(min(MAX_GEOMETRY, size // SECTOR))
        if chs[0] * chs[1] * chs[2] == MAX_GEOMETRY:
            sectors = size // SECTOR
            if sectors > MAX_SECTORS:
                raise InvalidArgumentError("The image size is too large for file format "
                                           "'vpc'", errno=errno.EFBIG)
        else:
            sectors = chs[0] * chs[1] * chs[2]
        self.size = sectors * SECTOR
        self.footer = Footer(
            data_offset=FOOTER_SIZE if self.disk_type == DISK_DYNAMIC else NO_OFFSET,
            timestamp=(int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF,
            creator_app=b"qem2" if force else b"qemu",
            orig_size=self.size, current_size=self.size,
            cylinders=chs[0], heads=chs[1], sectors=chs[2],
            disk_type=self.disk_type, uuid=_uuid.uuid4().bytes)
        self.entries = -(-sectors // (DEFAULT_BLOCK_SIZE // SECTOR))


def create_vpc(filename: str, options: dict) -> None:
    size = options.get("size")
    if size is None:
        raise InvalidArgumentError("Image creation needs a size parameter")
    plan = Plan(size, options.get("subformat"), options.get("force_size", False))
    footer = plan.footer.pack()
    file_bs = create_file(filename)
    try:
        if plan.disk_type == DISK_FIXED:
            # sparse: the data area is a hole, the footer follows it
            file_bs.truncate(plan.size)
            file_bs.pwrite(plan.size, footer)
        else:
            bat_bytes = -(-plan.entries * 4 // SECTOR) * SECTOR
            file_bs.pwrite(0, footer)
            file_bs.pwrite(BAT_OFFSET + bat_bytes, footer)
            if bat_bytes:
                file_bs.pwrite(BAT_OFFSET, b"\xff" * bat_bytes)
            hdr = DynHeader(max_table_entries=plan.entries, block_size=DEFAULT_BLOCK_SIZE)
            file_bs.pwrite(FOOTER_SIZE, hdr.pack())
        file_bs.flush()
    finally:
        file_bs.close()
    if plan.note:
        # blockdrv.driver has no channel for a driver's notes; stderr it is
        print(f"blockdrv: note: {plan.note}", file=sys.stderr)
