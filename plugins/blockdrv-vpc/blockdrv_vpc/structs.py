"""On-disk structures of a VHD (Microsoft's "Virtual Hard Disk Image Format
Specification"): the 512-byte footer, the 1024-byte dynamic disk header, the
footer checksum and the CHS geometry rules.  All fields are big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR = 512
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic",
                   DISK_DIFFERENCING: "differencing"}

UNALLOCATED = 0xFFFFFFFF          # a BAT entry with no block
NO_OFFSET = 0xFFFFFFFFFFFFFFFF    # "no next structure" (fixed disks, dynamic header)
DEFAULT_BLOCK_SIZE = 2 << 20
BAT_OFFSET = 3 * SECTOR           # where qemu (and Hyper-V) put the BAT: after both headers

# Seconds between the Unix epoch and the VHD epoch, 2000-01-01 00:00:00 UTC.
VHD_EPOCH = 946684800

# CHS limits: the largest geometry (65535 x 16 x 255) covers ~127 GiB; images
# beyond that store the size only in current_size.  The format's hard limit
# (32-bit sector numbers minus headroom) is 2040 GiB.
CHS_MAX_C, CHS_MAX_H, CHS_MAX_S = 65535, 16, 255
MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S
MAX_SECTORS = 0xFF000000

# Footer field offsets.
F_TIMESTAMP = 24
F_CREATOR_APP = 28
F_CHECKSUM = 64
F_UUID = 68

_FOOTER = struct.Struct(">8sIIQI4sHH4sQQHBBII16sB")
_DYN = struct.Struct(">8sQQIIII16sII")


def checksum(buf: bytes, skip: int) -> int:
    """One's complement of the byte sum, the 4 bytes at ``skip`` counted as zero."""
    total = sum(buf) - sum(buf[skip:skip + 4])
    return ~total & 0xFFFFFFFF


@dataclass
class Footer:
    cookie: bytes = FOOTER_COOKIE
    features: int = 2
    version: int = 0x00010000
    data_offset: int = NO_OFFSET
    timestamp: int = 0
    creator_app: bytes = b"qemu"
    creator_major: int = 5
    creator_minor: int = 3
    creator_os: bytes = b"Wi2k"
    orig_size: int = 0
    current_size: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    disk_type: int = DISK_DYNAMIC
    checksum: int = 0
    uuid: bytes = bytes(16)
    saved_state: int = 0

    @classmethod
    def unpack(cls, buf: bytes) -> "Footer":
        return cls(*_FOOTER.unpack_from(buf, 0))

    def pack(self, seal: bool = True) -> bytes:
        """The 512 bytes; ``seal``: compute the checksum field first."""
        raw = bytearray(FOOTER_SIZE)
        _FOOTER.pack_into(raw, 0, self.cookie, self.features, self.version,
                          self.data_offset, self.timestamp, self.creator_app,
                          self.creator_major, self.creator_minor, self.creator_os,
                          self.orig_size, self.current_size, self.cylinders, self.heads,
                          self.sectors, self.disk_type, self.checksum, self.uuid,
                          self.saved_state)
        if seal:
            self.checksum = checksum(raw, F_CHECKSUM)
            struct.pack_into(">I", raw, F_CHECKSUM, self.checksum)
        return bytes(raw)

    @property
    def chs_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors


@dataclass
class DynHeader:
    cookie: bytes = DYN_COOKIE
    data_offset: int = NO_OFFSET
    table_offset: int = BAT_OFFSET
    version: int = 0x00010000
    max_table_entries: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    checksum: int = 0
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    reserved: int = 0

    @classmethod
    def unpack(cls, buf: bytes) -> "DynHeader":
        return cls(*_DYN.unpack_from(buf, 0))

    def pack(self) -> bytes:
        raw = bytearray(DYN_HEADER_SIZE)
        _DYN.pack_into(raw, 0, self.cookie, self.data_offset, self.table_offset,
                       self.version, self.max_table_entries, self.block_size, 0,
                       self.parent_uuid, self.parent_timestamp, self.reserved)
        self.checksum = checksum(raw, 36)
        struct.pack_into(">I", raw, 36, self.checksum)
        return bytes(raw)


def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit per sector, whole sectors."""
    return -(-(block_size // (8 * SECTOR)) // SECTOR) * SECTOR


def geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for ``total_sectors``, the
    spec's algorithm (appendix "CHS calculation"), which may round down."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= CHS_MAX_C * 16 * 63:
        spt, heads = 255, 16
        cth = total_sectors // spt
    else:
        spt = 17
        cth = total_sectors // spt
        heads = max(4, -(-cth // 1024))
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total_sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total_sectors // spt
    return cth // heads, heads, spt


def geometry_covering(total_sectors: int) -> tuple[int, int, int]:
    """The first geometry (trying ``total_sectors``, +1, +2, ...) whose
    product is at least ``total_sectors``, so a converted image never shrinks;
    65535 x 16 x 255 when no smaller one covers it."""
    c = h = s = 0
    n = total_sectors
    while total_sectors > c * h * s:
        c, h, s = geometry(n)
        n += 1
    return c, h, s


# Creator applications, as the field is spelled (4 bytes) -> who made the image.
CREATORS = {
    b"vpc ": "Microsoft Virtual PC",
    b"vs  ": "Microsoft Virtual Server",
    b"win ": "Microsoft Windows (Hyper-V, Disk Management)",
    b"d2v ": "Sysinternals Disk2vhd",
    b"qemu": "QEMU (CHS size)",
    b"qem2": "QEMU (force_size)",
    b"tap\0": "Citrix XenServer",
    b"CTXS": "Citrix XenConverter",
    b"vbox": "Oracle VirtualBox",
}

# Creators whose images' size is current_size, not the CHS product (qemu's table).
SIZE_FROM_FOOTER = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def creator_name(app: bytes) -> str:
    known = CREATORS.get(app)
    if known:
        return known
    text = app.rstrip(b"\0 ").decode("latin-1")
    return f"unknown ({text!r})" if text else "unknown"
