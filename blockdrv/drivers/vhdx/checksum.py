"""CRC-32C as VHDX uses it: over a whole structure, its checksum field as zero.

Headers (4 KiB), region tables (64 KiB) and log entries carry a little-endian
CRC-32C computed with the checksum field itself replaced by zeros.  We feed the
bytes around the field to an incremental CRC instead of copying the buffer.
"""

from __future__ import annotations

import struct

from blockdrv._startup import load_extension


def _load_crc32c():
    """The ``crc32c`` package's C function (its extension alone when it can:
    the package's ``__init__`` costs a short command ~10 ms)."""
    ext = load_extension("crc32c._crc32c")
    if ext is not None:
        return ext.crc32c
    from crc32c import crc32c
    return crc32c


crc32c = _load_crc32c()

_ZEROS4 = bytes(4)


def compute(buf, crc_offset: int = 4) -> int:
    """CRC-32C of ``buf`` with the 4 bytes at ``crc_offset`` taken as zero."""
    view = memoryview(buf).cast("B")
    crc = crc32c(view[:crc_offset])
    crc = crc32c(_ZEROS4, crc)
    return crc32c(view[crc_offset + 4:], crc)


def stored(buf, crc_offset: int = 4) -> int:
    """The checksum value stored in ``buf``."""
    return struct.unpack_from("<I", buf, crc_offset)[0]


def verify(buf, crc_offset: int = 4) -> bool:
    """True if the checksum stored in ``buf`` matches its contents."""
    return stored(buf, crc_offset) == compute(buf, crc_offset)


def seal(buf: bytearray, crc_offset: int = 4) -> int:
    """Compute the checksum of ``buf`` and store it in place; returns it."""
    crc = compute(buf, crc_offset)
    struct.pack_into("<I", buf, crc_offset, crc)
    return crc
