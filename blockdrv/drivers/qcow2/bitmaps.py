"""Persistent dirty bitmaps (qcow2.txt "Bitmaps extension"): read to list
them in ``info`` and to count their clusters in ``check``; blockdrv never
changes them.

The header extension names the bitmap directory; each directory entry names
a bitmap table whose entries point at clusters of bitmap data.  qemu only
trusts the extension while the autoclear "bitmaps" bit is set.
"""

from __future__ import annotations

import struct

from .constants import AUTOCLEAR_BITMAPS, EXT_BITMAPS

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED = 0xFF000000000001FE
TABLE_ALL_ONES = 1
_ENTRY = struct.Struct(">QIIBBHI")       # table offset, size, flags, type, gran, name, extra
_EXT = struct.Struct(">IIQQ")            # nb_bitmaps, reserved, directory size, offset


class Bitmap:
    """One bitmap directory entry (the fields ``info`` and ``check`` read)."""
    __slots__ = ("name", "table_offset", "table_size", "flags", "granularity_bits")

    def __init__(self, name: str, table_offset: int, table_size: int, flags: int,
                 granularity_bits: int) -> None:
        self.name = name
        self.table_offset = table_offset
        self.table_size = table_size
        self.flags = flags
        self.granularity_bits = granularity_bits

    def info(self) -> dict:
        """qemu's Qcow2BitmapInfo."""
        flags = [n for bit, n in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
                 if self.flags & bit]
        return {"name": self.name, "granularity": 1 << self.granularity_bits,
                "flags": flags}


class Directory:
    """Where the bitmap directory lies, and how many entries it holds."""
    __slots__ = ("offset", "size", "count")

    def __init__(self, offset: int, size: int, count: int) -> None:
        self.offset = offset
        self.size = size
        self.count = count


def directory(h) -> Directory | None:
    """Where the bitmap directory is, when qemu would use it."""
    if not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    for ext in h.extensions:
        if ext.type == EXT_BITMAPS and len(ext.data) >= _EXT.size:
            count, _, size, offset = _EXT.unpack_from(ext.data)
            return Directory(offset, size, count) if count else None
    return None


def parse_directory(buf: bytes, count: int) -> list[Bitmap] | None:
    """The ``count`` entries of directory ``buf``; None when it is damaged."""
    out, pos = [], 0
    for _ in range(count):
        if pos + _ENTRY.size > len(buf):
            return None
        toff, tsize, flags, _type, gran, name_len, extra = _ENTRY.unpack_from(buf, pos)
        end = pos + _ENTRY.size + extra + name_len
        if end > len(buf):
            return None
        name = buf[end - name_len:end].decode("utf-8", "replace")
        out.append(Bitmap(name, toff, tsize, flags, gran))
        pos = end + (-end % 8)
    return out


def load(img) -> tuple[Directory | None, list[Bitmap] | None]:
    d = directory(img.h)
    if d is None:
        return None, []
    inside = max(0, min(d.size, img.file.total_size - d.offset))
    buf = bytes(img.file.pread(d.offset, inside)) if inside else b""
    return d, parse_directory(buf.ljust(d.size, b"\0"), d.count)


def entry_valid(entry: int, cluster_size: int) -> bool:
    """qemu's check_table_entry."""
    offset = entry & TABLE_OFFSET_MASK
    if entry & TABLE_RESERVED or offset % cluster_size:
        return False
    return not (entry & TABLE_ALL_ONES and offset)
