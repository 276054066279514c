"""Metadata region (spec 2.6): the table and the known items.

Reading is two-step so that no allocation is sized by an unchecked field:
parse the 64 KiB table, validate it against the region length, then read
each known item (each at most 1 MiB) and decode them into DiskParameters.
"""

from __future__ import annotations

import struct
from blockdrv._startup import TYPE_CHECKING, dataclass, field

if TYPE_CHECKING:
    from typing import Callable, Mapping

from blockdrv.errors import CorruptImageError, UnsupportedError

from .constants import (BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, FILE_PARAMETERS_GUID,
                        LOGICAL_SECTOR_SIZE_GUID, MAX_TABLE_ENTRIES, MAX_USER_METADATA_ENTRIES,
                        MAX_VIRTUAL_SIZE, META_IS_REQUIRED, META_IS_USER, META_IS_VIRTUAL_DISK,
                        METADATA_ITEM_MAX_LENGTH, METADATA_SIGNATURE, METADATA_TABLE_SIZE,
                        PAGE83_DATA_GUID, PARAM_HAS_PARENT, PARAM_LEAVE_BLOCKS_ALLOCATED,
                        PARENT_LOCATOR_GUID, PHYSICAL_SECTOR_SIZE_GUID, SECTOR_SIZES,
                        VIRTUAL_DISK_SIZE_GUID, ZERO_GUID, guid_from_bytes)

# Spec 2.6.1.1: Signature, Reserved (2), EntryCount (2), Reserved2 (20).
_TABLE_HEADER = struct.Struct("<8sHH20x")
# Spec 2.6.1.2: ItemID, Offset, Length, flag bits (IsUser, IsVirtualDisk, IsRequired), Reserved.
_ENTRY = struct.Struct("<16sIIII")
_FILE_PARAMS = struct.Struct("<II")        # spec 2.6.2.1: BlockSize, flags
_U64 = struct.Struct("<Q")                 # spec 2.6.2.2: VirtualDiskSize
_U32 = struct.Struct("<I")                 # spec 2.6.2.4/2.6.2.5: sector sizes
_LOCATOR_HEADER = struct.Struct("<16sHH")  # spec 2.6.2.6.1: LocatorType, Reserved, KeyValueCount
_LOCATOR_ENTRY = struct.Struct("<IIHH")    # spec 2.6.2.6.2: KeyOffset, ValueOffset, lengths

# name, minimum item length, flags qemu (and Hyper-V) set
KNOWN_ITEMS = {
    FILE_PARAMETERS_GUID: ("file parameters", 8, META_IS_REQUIRED),
    VIRTUAL_DISK_SIZE_GUID: ("virtual disk size", 8, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    PAGE83_DATA_GUID: ("page 83 data", 16, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    LOGICAL_SECTOR_SIZE_GUID: ("logical sector size", 4, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    PHYSICAL_SECTOR_SIZE_GUID: ("physical sector size", 4, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    PARENT_LOCATOR_GUID: ("parent locator", 20, META_IS_REQUIRED),
}
REQUIRED_ITEMS = tuple(list(KNOWN_ITEMS)[:5])


@dataclass
class MetadataEntry:
    item_id: bytes
    offset: int
    length: int
    flags: int = META_IS_REQUIRED   # raw 32-bit word: bit0 user, bit1 virtual disk, bit2 required
    reserved: int = 0

    is_user = property(lambda self: bool(self.flags & META_IS_USER))
    is_virtual_disk = property(lambda self: bool(self.flags & META_IS_VIRTUAL_DISK))
    is_required = property(lambda self: bool(self.flags & META_IS_REQUIRED))

    @property
    def name(self) -> str:
        known = KNOWN_ITEMS.get(self.item_id)
        return known[0] if known else str(guid_from_bytes(self.item_id))


@dataclass
class MetadataTable:
    entries: list[MetadataEntry] = field(default_factory=list)

    @classmethod
    def parse(cls, buf) -> "MetadataTable":
        """Parse the 64 KiB table at the start of the metadata region."""
        if len(buf) < METADATA_TABLE_SIZE:
            raise CorruptImageError("VHDX metadata table is truncated")
        sig, _, count = _TABLE_HEADER.unpack_from(buf)
        if sig != METADATA_SIGNATURE:
            raise CorruptImageError("VHDX metadata table has a bad signature")
        if count > MAX_TABLE_ENTRIES:
            raise CorruptImageError(f"VHDX metadata table has too many entries ({count})")
        return cls([MetadataEntry(*_ENTRY.unpack_from(buf, 32 + 32 * i)) for i in range(count)])

    def pack(self) -> bytes:
        if len(self.entries) > MAX_TABLE_ENTRIES:
            raise ValueError("too many metadata entries")
        buf = bytearray(METADATA_TABLE_SIZE)
        _TABLE_HEADER.pack_into(buf, 0, METADATA_SIGNATURE, 0, len(self.entries))
        for i, e in enumerate(self.entries):
            _ENTRY.pack_into(buf, 32 + 32 * i, e.item_id, e.offset, e.length, e.flags, e.reserved)
        return bytes(buf)

    def validate(self, region_length: int) -> dict[bytes, MetadataEntry]:
        """Check every entry; return the known items by GUID.

        CorruptImageError for bounds, duplicates, overlaps or a missing required
        item; UnsupportedError for an unknown item marked required.
        """
        known: dict[bytes, MetadataEntry] = {}
        seen: set[tuple[bytes, bool]] = set()
        spans = []
        for e in self.entries:
            if (e.item_id, e.is_user) in seen:
                raise CorruptImageError(f"VHDX metadata item {e.name} is listed twice")
            seen.add((e.item_id, e.is_user))
            if e.length == 0:
                if e.offset != 0:
                    raise CorruptImageError(
                        f"VHDX metadata item {e.name} is empty but has an offset")
            elif (e.offset < METADATA_TABLE_SIZE or e.length > METADATA_ITEM_MAX_LENGTH
                  or e.offset + e.length > region_length):
                raise CorruptImageError(f"VHDX metadata item {e.name} lies outside its region")
            else:
                spans.append((e.offset, e.offset + e.length, e.name))
            if e.item_id in KNOWN_ITEMS and not e.is_user:
                if e.length < KNOWN_ITEMS[e.item_id][1]:
                    raise CorruptImageError(f"VHDX metadata item {e.name} is too short")
                known[e.item_id] = e
            elif e.is_required:
                raise UnsupportedError(f"VHDX image has an unknown required metadata item {e.name}")
        if sum(1 for e in self.entries if e.is_user) > MAX_USER_METADATA_ENTRIES:
            raise CorruptImageError("VHDX metadata table has too many user items")
        spans.sort()
        for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:]):
            if s2 < e1:
                raise CorruptImageError(f"VHDX metadata items {n1} and {n2} overlap")
        for guid in REQUIRED_ITEMS:
            if guid not in known:
                raise CorruptImageError(f"VHDX metadata has no {KNOWN_ITEMS[guid][0]} item")
        return known


@dataclass
class ParentLocator:
    locator_type: bytes
    entries: dict[str, str]

    @classmethod
    def parse(cls, buf) -> "ParentLocator":
        buf = memoryview(buf)
        ltype, _, count = _LOCATOR_HEADER.unpack_from(buf)
        if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(buf):
            raise CorruptImageError("VHDX parent locator entries exceed the item")
        entries = {}
        for i in range(count):
            ko, vo, kl, vl = _LOCATOR_ENTRY.unpack_from(buf, _LOCATOR_HEADER.size + i * 12)
            if not (ko and vo and kl and vl) or ko + kl > len(buf) or vo + vl > len(buf):
                raise CorruptImageError("VHDX parent locator entry is out of bounds")
            try:
                key = bytes(buf[ko:ko + kl]).decode("utf-16-le")
                entries[key] = bytes(buf[vo:vo + vl]).decode("utf-16-le")
            except UnicodeDecodeError:
                raise CorruptImageError("VHDX parent locator is not valid UTF-16") from None
        return cls(bytes(ltype), entries)

    def pack(self) -> bytes:
        table = bytearray(_LOCATOR_HEADER.pack(self.locator_type, 0, len(self.entries)))
        strings = bytearray()
        base = _LOCATOR_HEADER.size + _LOCATOR_ENTRY.size * len(self.entries)
        for key, value in self.entries.items():
            k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
            ko = base + len(strings)
            strings += k
            table += _LOCATOR_ENTRY.pack(ko, ko + len(k), len(k), len(v))
            strings += v
        return bytes(table + strings)


@dataclass
class DiskParameters:
    """The decoded known items: what the driver needs to open the image."""
    block_size: int
    virtual_size: int
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    page83: bytes = ZERO_GUID
    leave_blocks_allocated: bool = False
    has_parent: bool = False
    parent_locator: ParentLocator | None = None

    @classmethod
    def from_items(cls, items: Mapping[bytes, bytes], *,
                   allow_differencing=False) -> "DiskParameters":
        """Decode and check item contents keyed by GUID (see MetadataTable.validate)."""
        block_size, bits = _FILE_PARAMS.unpack_from(items[FILE_PARAMETERS_GUID])
        params = cls(
            block_size=block_size,
            virtual_size=_U64.unpack_from(items[VIRTUAL_DISK_SIZE_GUID])[0],
            logical_sector_size=_U32.unpack_from(items[LOGICAL_SECTOR_SIZE_GUID])[0],
            physical_sector_size=_U32.unpack_from(items[PHYSICAL_SECTOR_SIZE_GUID])[0],
            page83=bytes(items[PAGE83_DATA_GUID][:16]),
            leave_blocks_allocated=bool(bits & PARAM_LEAVE_BLOCKS_ALLOCATED),
            has_parent=bool(bits & PARAM_HAS_PARENT))
        if PARENT_LOCATOR_GUID in items:
            params.parent_locator = ParentLocator.parse(items[PARENT_LOCATOR_GUID])
        params.validate(allow_differencing=allow_differencing)
        return params

    def validate(self, *, allow_differencing=False) -> None:
        bs = self.block_size
        if not BLOCK_SIZE_MIN <= bs <= BLOCK_SIZE_MAX or bs & (bs - 1):
            raise CorruptImageError(
                f"VHDX block size {bs} is not a power of two in 1 MiB..256 MiB")
        for kind, value in (("logical", self.logical_sector_size),
                            ("physical", self.physical_sector_size)):
            if value not in SECTOR_SIZES:
                raise CorruptImageError(f"VHDX {kind} sector size {value} is invalid")
        if self.virtual_size % self.logical_sector_size:
            raise CorruptImageError(
                "VHDX virtual size is not a multiple of the logical sector size")
        if self.virtual_size > MAX_VIRTUAL_SIZE:
            raise CorruptImageError(f"VHDX virtual size {self.virtual_size} exceeds 64 TiB")
        if self.has_parent:
            if self.parent_locator is None:
                raise CorruptImageError("VHDX image has a parent but no parent locator")
            if not allow_differencing:
                raise UnsupportedError("VHDX differencing images are not supported")

    def items(self) -> list[tuple[bytes, bytes]]:
        """(GUID, item bytes) in the order qemu writes them."""
        bits = ((PARAM_LEAVE_BLOCKS_ALLOCATED if self.leave_blocks_allocated else 0)
                | (PARAM_HAS_PARENT if self.has_parent else 0))
        out = [(FILE_PARAMETERS_GUID, _FILE_PARAMS.pack(self.block_size, bits)),
               (VIRTUAL_DISK_SIZE_GUID, _U64.pack(self.virtual_size)),
               (PAGE83_DATA_GUID, self.page83),
               (LOGICAL_SECTOR_SIZE_GUID, _U32.pack(self.logical_sector_size)),
               (PHYSICAL_SECTOR_SIZE_GUID, _U32.pack(self.physical_sector_size))]
        if self.parent_locator is not None:
            out.append((PARENT_LOCATOR_GUID, self.parent_locator.pack()))
        return out


def build_metadata(params: DiskParameters) -> tuple[bytes, bytes]:
    """(64 KiB table, packed items to write at region offset 64 KiB).

    Items are packed back to back right after the table, as qemu does.
    """
    table, blob, offset = MetadataTable(), bytearray(), METADATA_TABLE_SIZE
    for guid, data in params.items():
        table.entries.append(MetadataEntry(guid, offset, len(data), KNOWN_ITEMS[guid][2]))
        blob += data
        offset += len(data)
    return table.pack(), bytes(blob)


def read_metadata(read: Callable[[int, int], bytes], region_length: int, *,
                  allow_differencing=False) -> tuple[MetadataTable, DiskParameters]:
    """Parse and validate a metadata region via ``read(offset_in_region, length)``."""
    if region_length < METADATA_TABLE_SIZE:
        raise CorruptImageError("VHDX metadata region is smaller than its table")
    table = MetadataTable.parse(read(0, METADATA_TABLE_SIZE))
    known = table.validate(region_length)
    items = {}
    for guid, entry in known.items():
        data = read(entry.offset, entry.length)
        if len(data) < entry.length:
            raise CorruptImageError(f"VHDX metadata item {entry.name} is truncated")
        items[guid] = data
    return table, DiskParameters.from_items(items, allow_differencing=allow_differencing)
