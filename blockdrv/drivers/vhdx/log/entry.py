"""One log entry (MS-VHDX v6.0, section 2.3.1): its structures, built and read.

An entry is one or more descriptor sectors (the first starts with the 64-byte
header, 32 bytes per descriptor after it) followed by one data sector per data
descriptor.  :func:`build_entry` serialises one; :func:`read_entry` is its
inverse, returning only entries valid by 2.3.1 and 2.3.3 step 3.
"""

from __future__ import annotations

import struct

from blockdrv._startup import TYPE_CHECKING, dataclass, field

from blockdrv.errors import InvalidArgumentError

from .. import checksum as _crc
from ..constants import LOG_DATA_SIGNATURE as SIG_DATA
from ..constants import LOG_DESC_SIGNATURE as SIG_DESC
from ..constants import LOG_ENTRY_SIGNATURE as SIG_ENTRY
from ..constants import LOG_SECTOR_SIZE as SECTOR
from ..constants import LOG_ZERO_SIGNATURE as SIG_ZERO
from ..constants import ZERO_GUID

if TYPE_CHECKING:
    from typing import ClassVar, Iterable, Self
    from .sequence import _Budget, _Ring

# Sanity bound on any file offset a log entry may name (VHDX tops out at 64 TiB
# of payload); keeps replay from extending a file to exabytes on a crafted entry.
MAX_FILE_OFFSET = 1 << 48
# Data bytes a data sector holds: bytes 8..4091 of the 4 KiB update (2.3.1.4).
DATA_BYTES = 4084

# 2.3.1.1 Entry Header: Signature, Checksum, EntryLength, Tail, SequenceNumber,
# DescriptorCount, Reserved, LogGuid, FlushedFileOffset, LastFileOffset.
_ENTRY = struct.Struct("<4sIIIQII16sQQ")
# 2.3.1.2 Zero Descriptor: ZeroSignature, Reserved, ZeroLength, FileOffset, SequenceNumber.
_ZERO = struct.Struct("<4sIQQQ")
# 2.3.1.3 Data Descriptor: DataSignature, TrailingBytes, LeadingBytes, FileOffset,
# SequenceNumber.  Leading/trailing bytes are kept raw: they are file bytes.
_DESC = struct.Struct("<4s4s8sQQ")
# 2.3.1.4 Data Sector: DataSignature, SequenceHigh, Data[4084], SequenceLow.
_DATA_HEAD = struct.Struct("<4sI")
_DATA_TAIL = struct.Struct("<I")
assert _ENTRY.size == 64 and _ZERO.size == _DESC.size == 32


class _Packed:
    """``parse``/``pack`` for a dataclass whose on-disk fields, in ``_FORMAT``
    order, are named by ``_ORDER`` (the dataclass keeps a friendlier order
    for construction)."""

    _FORMAT: ClassVar[struct.Struct]
    _ORDER: ClassVar[tuple[str, ...]]

    @classmethod
    def parse(cls, buf, offset: int = 0) -> Self:
        return cls(**dict(zip(cls._ORDER, cls._FORMAT.unpack_from(buf, offset))))

    def pack(self) -> bytes:
        return self._FORMAT.pack(*[getattr(self, name) for name in self._ORDER])


@dataclass
class LogEntryHeader(_Packed):
    entry_length: int = 0
    tail: int = 0
    sequence_number: int = 0
    descriptor_count: int = 0
    log_guid: bytes = ZERO_GUID
    flushed_file_offset: int = 0
    last_file_offset: int = 0
    checksum: int = 0
    reserved: int = 0
    signature: bytes = SIG_ENTRY

    _FORMAT = _ENTRY
    _ORDER = ("signature", "checksum", "entry_length", "tail", "sequence_number",
              "descriptor_count", "reserved", "log_guid", "flushed_file_offset",
              "last_file_offset")


@dataclass
class ZeroDescriptor(_Packed):
    file_offset: int = 0
    zero_length: int = 0
    sequence_number: int = 0
    reserved: int = 0
    signature: bytes = SIG_ZERO

    _FORMAT = _ZERO
    _ORDER = ("signature", "reserved", "zero_length", "file_offset", "sequence_number")


@dataclass
class DataDescriptor(_Packed):
    file_offset: int = 0
    leading_bytes: bytes = bytes(8)
    trailing_bytes: bytes = bytes(4)
    sequence_number: int = 0
    signature: bytes = SIG_DESC

    _FORMAT = _DESC
    _ORDER = ("signature", "trailing_bytes", "leading_bytes", "file_offset", "sequence_number")


@dataclass
class DataSector:
    data: bytes = bytes(DATA_BYTES)
    sequence_high: int = 0
    sequence_low: int = 0
    signature: bytes = SIG_DATA

    @classmethod
    def parse(cls, buf, offset: int = 0) -> "DataSector":
        sig, high = _DATA_HEAD.unpack_from(buf, offset)
        (low,) = _DATA_TAIL.unpack_from(buf, offset + 8 + DATA_BYTES)
        return cls(bytes(buf[offset + 8:offset + 8 + DATA_BYTES]), high, low, sig)

    def pack(self) -> bytes:
        return (_DATA_HEAD.pack(self.signature, self.sequence_high) + self.data
                + _DATA_TAIL.pack(self.sequence_low))

    @property
    def sequence_number(self) -> int:
        return self.sequence_high << 32 | self.sequence_low


def split_sector(update: bytes, file_offset: int, seq: int) -> tuple[DataDescriptor, DataSector]:
    """A 4 KiB update as its descriptor (bytes 0..7 and 4092..4095) and data sector."""
    if len(update) != SECTOR:
        raise InvalidArgumentError("a log data update must be exactly 4 KiB")
    desc = DataDescriptor(file_offset, bytes(update[:8]), bytes(update[8 + DATA_BYTES:]), seq)
    return desc, DataSector(bytes(update[8:8 + DATA_BYTES]), seq >> 32, seq & 0xFFFFFFFF)


def join_sector(desc: DataDescriptor, sector: DataSector) -> bytes:
    """Inverse of :func:`split_sector`: the 4 KiB that lands at ``desc.file_offset``."""
    return desc.leading_bytes + sector.data + desc.trailing_bytes


def descriptor_sectors(count: int) -> int:
    """Sectors holding ``count`` descriptors: the 64-byte header uses two slots."""
    return -(-(count + 2) // 128)


@dataclass
class LogEntry:
    """A validated entry: where it sits in the ring and what it replays."""

    position: int                       # byte offset inside the log
    header: LogEntryHeader
    # In order: DataDescriptor paired with its 4 KiB update, or ZeroDescriptor.
    descriptors: list = field(default_factory=list)

    @property
    def sequence_number(self) -> int:
        return self.header.sequence_number


def build_entry(seq: int, log_guid: bytes, tail: int, updates: Iterable[tuple[int, bytes]],
                *, flushed_file_offset: int, last_file_offset: int,
                zeros: Iterable[tuple[int, int]] = ()) -> bytes:
    """Serialise one entry: zero descriptors, then data descriptors, then data sectors.

    ``updates`` are ``(file_offset, 4 KiB)`` pairs; ``zeros`` are ``(file_offset,
    length)`` pairs.  Unused descriptor slots are zero (qemu leaves them
    uninitialised).  The checksum covers the whole entry.
    """
    descs: list[bytes] = [ZeroDescriptor(off, n, seq).pack() for off, n in zeros]
    sectors: list[bytes] = []
    for off, data in updates:
        if off % SECTOR:
            raise InvalidArgumentError("log updates must be 4 KiB aligned")
        desc, sector = split_sector(data, off, seq)
        descs.append(desc.pack())
        sectors.append(sector.pack())
    nd = descriptor_sectors(len(descs))
    length = (nd + len(sectors)) * SECTOR
    hdr = LogEntryHeader(length, tail, seq, len(descs), log_guid,
                         flushed_file_offset, last_file_offset)
    buf = bytearray(nd * SECTOR)
    buf[:64] = hdr.pack()
    buf[64:64 + 32 * len(descs)] = b"".join(descs)
    buf += b"".join(sectors)
    _crc.seal(buf)
    return bytes(buf)


def read_entry(ring: _Ring, pos: int, log_guid: bytes, budget: _Budget | None = None
               ) -> LogEntry | None:
    """The valid entry starting at ``pos``, or None (spec 2.3.1 and 2.3.3 step 3)."""
    length = ring.length
    head = ring.read(pos, 64)
    hdr = LogEntryHeader.parse(head)
    # Cheap header checks first: they bound every later read by the log length.
    if (hdr.signature != SIG_ENTRY or hdr.log_guid != log_guid or hdr.sequence_number == 0
            or hdr.entry_length == 0 or hdr.entry_length % SECTOR
            or hdr.entry_length > length or hdr.tail % SECTOR or hdr.tail >= length):
        return None
    nd = descriptor_sectors(hdr.descriptor_count)
    ndata = hdr.entry_length // SECTOR - nd
    if ndata < 0 or max(hdr.flushed_file_offset, hdr.last_file_offset) > MAX_FILE_OFFSET:
        return None
    if budget is not None:
        budget.spend(hdr.entry_length)
    buf = ring.read(pos, hdr.entry_length)
    if _crc.compute(buf) != hdr.checksum:
        return None
    seq = hdr.sequence_number
    descs: list = []
    data_at = nd * SECTOR
    for i in range(hdr.descriptor_count):
        off = 64 + 32 * i
        sig = buf[off:off + 4]
        if sig == SIG_DESC:
            d = DataDescriptor.parse(buf, off)
            if data_at >= len(buf):
                return None             # more data descriptors than data sectors
            sector = DataSector.parse(buf, data_at)
            data_at += SECTOR
            if sector.signature != SIG_DATA or sector.sequence_number != seq:
                return None             # torn or misdirected data sector
            end = d.file_offset + SECTOR
            item = (d, join_sector(d, sector))
        elif sig == SIG_ZERO:
            d = ZeroDescriptor.parse(buf, off)
            if d.zero_length % SECTOR:
                return None
            end = d.file_offset + d.zero_length
            item = d
        else:
            return None
        if d.sequence_number != seq or d.file_offset % SECTOR or end > MAX_FILE_OFFSET:
            return None
        descs.append(item)
    if data_at != len(buf):
        return None                     # data sectors must match data descriptors
    return LogEntry(pos, hdr, descs)
