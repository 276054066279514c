"""Build invalid VHDX images: one targeted mutation of a valid image.

``Vhdx`` wraps the bytes of a valid image (made by ``blockdrv.create_image`` or
qemu-img) and knows where every structure lives, so a test can change one
field and, where the point is to reach a deeper check, re-seal the checksums
(headers, region tables, log entries) so the parser meets the bad value
instead of stopping at the CRC.

This module is deliberately independent of the driver's parsers (it uses
``struct`` directly) so a parser bug cannot hide a corruption.
:func:`make_dirty_log` makes an image with one unapplied log entry.
"""

from __future__ import annotations

import os
import struct
import uuid

from crc32c import crc32c

KiB, MiB = 1024, 1024 * 1024
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_OFFSETS = (192 * KiB, 256 * KiB)


def _g(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = _g("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _g("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = _g("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = _g("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83 = _g("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = _g("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = _g("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = _g("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

# Header fields (spec 2.2.2): name -> (struct format, offset)
HEADER_FIELDS = {
    "signature": ("4s", 0), "checksum": ("I", 4), "sequence_number": ("Q", 8),
    "file_write_guid": ("16s", 16), "data_write_guid": ("16s", 32), "log_guid": ("16s", 48),
    "log_version": ("H", 64), "version": ("H", 66), "log_length": ("I", 68),
    "log_offset": ("Q", 72),
}


def crc_seal(buf: bytearray, start: int, length: int, crc_at: int = 4) -> None:
    """Store the CRC-32C of ``buf[start:start+length]`` (checksum field as zero)."""
    struct.pack_into("<I", buf, start + crc_at, 0)
    struct.pack_into("<I", buf, start + crc_at, crc32c(bytes(buf[start:start + length])))


class Vhdx:
    """Bytes of one image plus typed accessors to its structures."""

    def __init__(self, data) -> None:
        self.data = bytearray(data)

    @classmethod
    def load(cls, path) -> "Vhdx":
        with open(path, "rb") as fh:
            return cls(fh.read())

    def save(self, path) -> str:
        with open(path, "wb") as fh:
            fh.write(self.data)
        return os.fspath(path)

    def copy(self) -> "Vhdx":
        return Vhdx(self.data)

    # -- raw ------------------------------------------------------------------
    def u(self, fmt: str, off: int):
        return struct.unpack_from("<" + fmt, self.data, off)[0]

    def put(self, fmt: str, off: int, value) -> None:
        end = off + struct.calcsize("<" + fmt)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        struct.pack_into("<" + fmt, self.data, off, value)

    def truncate(self, length: int) -> None:
        if length <= len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))

    # -- headers --------------------------------------------------------------
    def header(self, idx: int) -> dict:
        base = HEADER_OFFSETS[idx]
        return {k: self.u(f, base + o) for k, (f, o) in HEADER_FIELDS.items()}

    @property
    def current(self) -> int:
        a, b = (self.header(i)["sequence_number"] for i in (0, 1))
        return 0 if a >= b else 1

    def set_header(self, idx: int | None = None, reseal: bool = True, **fields) -> None:
        """Change header fields (both headers when ``idx`` is None)."""
        for i in ((0, 1) if idx is None else (idx,)):
            base = HEADER_OFFSETS[i]
            for k, v in fields.items():
                f, o = HEADER_FIELDS[k]
                self.put(f, base + o, v)
            if reseal:
                crc_seal(self.data, base, 4 * KiB)

    @property
    def log_offset(self) -> int:
        return self.header(self.current)["log_offset"]

    @property
    def log_length(self) -> int:
        return self.header(self.current)["log_length"]

    # -- region table ---------------------------------------------------------
    def regions(self, copy: int = 0) -> list[list]:
        base = REGION_OFFSETS[copy]
        count = self.u("I", base + 8)
        return [list(struct.unpack_from("<16sQII", self.data, base + 16 + 32 * i))
                for i in range(min(count, 2047))]

    def set_regions(self, entries=None, count: int | None = None, signature: bytes | None = None,
                    reseal: bool = True, copies=(0, 1)) -> None:
        """Rewrite the region table(s); ``entries`` as [guid, offset, length, required]."""
        for c in copies:
            base = REGION_OFFSETS[c]
            if entries is not None:
                self.data[base + 16:base + 64 * KiB] = bytes(64 * KiB - 16)
                for i, e in enumerate(entries):
                    struct.pack_into("<16sQII", self.data, base + 16 + 32 * i, *e)
                self.put("I", base + 8, len(entries))
            if count is not None:
                self.put("I", base + 8, count)
            if signature is not None:
                self.data[base:base + 4] = signature
            if reseal:
                crc_seal(self.data, base, 64 * KiB)

    def region(self, guid: bytes) -> list:
        return next(e for e in self.regions() if e[0] == guid)

    def set_region(self, guid: bytes, file_offset=None, length=None, required=None,
                   reseal: bool = True) -> None:
        entries = self.regions()
        for e in entries:
            if e[0] == guid:
                if file_offset is not None:
                    e[1] = file_offset
                if length is not None:
                    e[2] = length
                if required is not None:
                    e[3] = required
        self.set_regions(entries, reseal=reseal)

    @property
    def bat_offset(self) -> int:
        return self.region(BAT_GUID)[1]

    @property
    def bat_length(self) -> int:
        return self.region(BAT_GUID)[2]

    @property
    def metadata_offset(self) -> int:
        return self.region(METADATA_GUID)[1]

    # -- metadata -------------------------------------------------------------
    def metadata_entries(self) -> list[list]:
        base = self.metadata_offset
        count = self.u("H", base + 10)
        return [list(struct.unpack_from("<16sIIII", self.data, base + 32 + 32 * i))
                for i in range(min(count, 2047))]

    def set_metadata(self, entries=None, count: int | None = None,
                     signature: bytes | None = None) -> None:
        """Rewrite the metadata table (it carries no checksum)."""
        base = self.metadata_offset
        if entries is not None:
            self.data[base + 32:base + 64 * KiB] = bytes(64 * KiB - 32)
            for i, e in enumerate(entries):
                struct.pack_into("<16sIIII", self.data, base + 32 + 32 * i, *e)
            self.put("H", base + 10, len(entries))
        if count is not None:
            self.put("H", base + 10, count)
        if signature is not None:
            self.data[base:base + 8] = signature

    def set_metadata_entry(self, guid: bytes, offset=None, length=None, flags=None) -> None:
        entries = self.metadata_entries()
        for e in entries:
            if e[0] == guid:
                if offset is not None:
                    e[1] = offset
                if length is not None:
                    e[2] = length
                if flags is not None:
                    e[3] = flags
        self.set_metadata(entries)

    def item_offset(self, guid: bytes) -> int:
        e = next(e for e in self.metadata_entries() if e[0] == guid)
        return self.metadata_offset + e[1]

    def set_item(self, guid: bytes, fmt: str, value, at: int = 0) -> None:
        self.put(fmt, self.item_offset(guid) + at, value)

    def item(self, guid: bytes, fmt: str, at: int = 0):
        return self.u(fmt, self.item_offset(guid) + at)

    @property
    def block_size(self) -> int:
        return self.item(FILE_PARAMETERS, "I")

    @property
    def virtual_size(self) -> int:
        return self.item(VIRTUAL_DISK_SIZE, "Q")

    @property
    def logical_sector_size(self) -> int:
        return self.item(LOGICAL_SECTOR_SIZE, "I")

    # -- BAT --------------------------------------------------------------------
    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.logical_sector_size // self.block_size

    def bat_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bat(self, index: int) -> int:
        return self.u("Q", self.bat_offset + 8 * index)

    def set_bat(self, index: int, raw: int) -> None:
        self.put("Q", self.bat_offset + 8 * index, raw)

    def set_block(self, block: int, state: int, file_offset: int = 0) -> None:
        self.set_bat(self.bat_index(block), file_offset | state)

    def block(self, block: int) -> tuple[int, int]:
        raw = self.bat(self.bat_index(block))
        return raw & 7, raw & ~(MiB - 1) & ((1 << 64) - 1)

    @property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    # -- log --------------------------------------------------------------------
    def log_entries(self) -> list[int]:
        """File offsets of sectors in the log that start with ``loge``."""
        lo, n = self.log_offset, self.log_length
        return [lo + p for p in range(0, n, 4 * KiB) if self.data[lo + p:lo + p + 4] == b"loge"]

    def reseal_log_entry(self, at: int) -> None:
        """Recompute the checksum of the (non-wrapping) log entry at file offset ``at``."""
        length = self.u("I", at + 8)
        crc_seal(self.data, at, length)


def make_dirty_log(path, size: str = "64M", pattern: int = 0xAB, **create_opts) -> dict:
    """A blockdrv-made image whose log holds one unapplied entry.

    The entry allocates block 0 at the end of file (payload filled with
    ``pattern``); the data is on disk, the BAT sector is not, and both headers
    name the entry's LogGuid -- what a power cut after the journal flush leaves.
    Returns facts for assertions.
    """
    import blockdrv

    blockdrv.create_image(path, "vhdx", size, **create_opts).close()
    return pend_block_allocation(path, 0, pattern)


def pend_block_allocation(path, block: int, pattern: int = 0xAB) -> dict:
    """Give ``block`` of an existing image a new block at the end of the file
    (filled with ``pattern``) whose BAT update is left pending in the log, as
    a power cut after the journal flush leaves it.  Returns facts for assertions."""
    from blockdrv.drivers.vhdx import log as vlog

    img = Vhdx.load(path)
    bsize = img.block_size
    new_off = -(-len(img.data) // MiB) * MiB
    img.truncate(new_off + bsize)
    img.data[new_off:new_off + bsize] = bytes([pattern]) * bsize
    at = img.bat_offset + 8 * img.bat_index(block)
    sector_at = at - at % (4 * KiB)
    sector = bytearray(img.data[sector_at:sector_at + 4 * KiB])
    struct.pack_into("<Q", sector, at - sector_at, new_off | 6)
    guid = uuid.uuid4().bytes_le
    entry = vlog.build_entry(1, guid, 0, [(sector_at, bytes(sector))],
                             flushed_file_offset=len(img.data),
                             last_file_offset=len(img.data))
    lo = img.log_offset
    img.data[lo:lo + len(entry)] = entry
    img.set_header(log_guid=guid)
    img.save(path)
    return {"block_offset": new_off, "pattern": pattern, "block_size": bsize,
            "log_entry": lo, "entry_length": len(entry), "log_guid": guid}
