"""Region table (spec 2.2.3): where the BAT and metadata regions live."""

from __future__ import annotations

import struct
from blockdrv._startup import dataclass, field

from blockdrv.errors import CorruptImageError, UnsupportedError

from . import checksum as _crc
from .constants import (ALIGNMENT, BAT_GUID, HEADER_SECTION_SIZE, MAX_TABLE_ENTRIES,
                        METADATA_GUID, REGION_REQUIRED, REGION_SIGNATURE, REGION_TABLE_SIZE,
                        guid_from_bytes)

# Spec 2.2.3.1: Signature, Checksum, EntryCount, Reserved.
_TABLE_HEADER = struct.Struct("<4sIII")
# Spec 2.2.3.2: Guid, FileOffset, Length, Required.
_ENTRY = struct.Struct("<16sQII")

_KNOWN = {BAT_GUID: "BAT", METADATA_GUID: "metadata"}


@dataclass
class RegionEntry:
    guid: bytes
    file_offset: int
    length: int
    # Raw 32-bit field, bit 0 = required.  Defaults to 0 because qemu 7.2
    # writes 0 even for the BAT and metadata regions (the spec calls them
    # required, but a reader must know those two anyway).
    required: int = 0

    @property
    def end(self) -> int:
        return self.file_offset + self.length

    @property
    def name(self) -> str:
        return _KNOWN.get(self.guid) or str(guid_from_bytes(self.guid))


@dataclass
class RegionTable:
    entries: list[RegionEntry] = field(default_factory=list)
    checksum: int = 0

    @classmethod
    def parse(cls, buf) -> "RegionTable":
        """Parse a 64 KiB region table; checks signature, checksum, entry count."""
        if len(buf) < REGION_TABLE_SIZE:
            raise CorruptImageError("VHDX region table is truncated")
        view = memoryview(buf)[:REGION_TABLE_SIZE]
        sig, stored, count, _ = _TABLE_HEADER.unpack_from(view)
        if sig != REGION_SIGNATURE:
            raise CorruptImageError("VHDX region table has a bad signature")
        if stored != _crc.compute(view):
            raise CorruptImageError("VHDX region table checksum mismatch")
        if count > MAX_TABLE_ENTRIES:
            raise CorruptImageError(f"VHDX region table has too many entries ({count})")
        entries = [RegionEntry(*_ENTRY.unpack_from(view, _TABLE_HEADER.size + i * _ENTRY.size))
                   for i in range(count)]
        return cls(entries, stored)

    def pack(self) -> bytes:
        if len(self.entries) > MAX_TABLE_ENTRIES:
            raise ValueError("too many region table entries")
        buf = bytearray(REGION_TABLE_SIZE)
        _TABLE_HEADER.pack_into(buf, 0, REGION_SIGNATURE, 0, len(self.entries), 0)
        for i, e in enumerate(self.entries):
            _ENTRY.pack_into(buf, _TABLE_HEADER.size + i * _ENTRY.size,
                             e.guid, e.file_offset, e.length, e.required)
        self.checksum = _crc.seal(buf)
        return bytes(buf)

    def find(self, guid: bytes) -> RegionEntry | None:
        return next((e for e in self.entries if e.guid == guid), None)

    @property
    def bat(self) -> RegionEntry:
        entry = self.find(BAT_GUID)
        if entry is None:
            raise CorruptImageError("VHDX region table has no BAT region")
        return entry

    @property
    def metadata(self) -> RegionEntry:
        entry = self.find(METADATA_GUID)
        if entry is None:
            raise CorruptImageError("VHDX region table has no metadata region")
        return entry

    def validate(self, log_offset: int = 0, log_length: int = 0,
                 file_size: int | None = None,
                 overlaps: list[str] | None = None) -> None:
        """Check the entries against each other, the header section and the log.

        Raises CorruptImageError, or UnsupportedError for an unknown region
        marked required (the spec says we must refuse to open those).  With
        ``overlaps`` (a list, from ``check``), overlapping regions are appended
        there as messages instead of raised, so they can be counted.
        """
        seen: set[bytes] = set()
        spans = [(0, HEADER_SECTION_SIZE, "header section")]
        if log_length:
            spans.append((log_offset, log_offset + log_length, "log"))
        for e in self.entries:
            if e.guid in seen:
                raise CorruptImageError(f"VHDX region {e.name} is listed twice")
            seen.add(e.guid)
            if e.guid not in _KNOWN and e.required & REGION_REQUIRED:
                raise UnsupportedError(f"VHDX image has an unknown required region {e.name}")
            if e.file_offset % ALIGNMENT or e.length % ALIGNMENT:
                raise CorruptImageError(f"VHDX region {e.name} is not 1 MiB aligned")
            if file_size is not None and e.end > file_size:
                raise CorruptImageError(f"VHDX region {e.name} lies beyond the end of the file")
            if e.length:
                spans.append((e.file_offset, e.end, e.name))
        for guid, name in _KNOWN.items():
            if guid not in seen:
                raise CorruptImageError(f"VHDX region table has no {name} region")
        spans.sort()
        for (s1, e1, n1), (s2, e2, n2) in zip(spans, spans[1:]):
            if s2 < e1:
                message = f"VHDX {n1} and {n2} regions overlap"
                if overlaps is None:
                    raise CorruptImageError(message)
                overlaps.append(message)
