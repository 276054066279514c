"""The VHDX metadata journal (MS-VHDX v6.0, section 2.3): parse, replay, write.

The log is a ring of 4 KiB sectors at ``log_offset``.  An entry is one or more
descriptor sectors (the first starts with a 64-byte header) followed by one
data sector per data descriptor.  Entries may straddle the end of the ring;
every read and write here goes sector by sector modulo ``log_length``.

Behaviour matches qemu-img 7.2 where the spec leaves room (checked against
the installed binary, see tests/interop/test_vhdx_log.py):

* qemu writes one entry per BAT update: a single data descriptor carrying the
  whole 4 KiB sector that holds the 8-byte BAT entry, merged with the file's
  current bytes.  flushed_file_offset = last_file_offset = file length at the
  time of the write; tail = the entry's own offset (the previous entry is
  always fully applied first).
* Every entry gets a fresh LogGuid: the header's LogGuid is set just before
  the entry is written and cleared right after it is applied.
* Per open, the ring position restarts at 0 and the sequence number at 1
  (or at head+1 if this open replayed a log).  Nothing is random except the
  LogGuid and the never-initialised tail of descriptor sectors (we write zeros
  there), which makes the entry checksum differ too.

Where qemu is laxer than the spec (it never checks data-sector signatures or
the head's tail, and compares sequences by their first entry) we follow the
spec; for every log qemu itself writes, both give the same result.
"""

from __future__ import annotations

import bisect
import struct
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable

from blockdrv.errors import (BlockIOError, CorruptImageError, InvalidArgumentError,
                             UnsupportedError)

from . import checksum as _crc

SECTOR = 4096
MiB = 1 << 20
ZERO_GUID = bytes(16)
# Sanity bound on any file offset a log entry may name (VHDX tops out at 64 TiB
# of payload); keeps replay from extending a file to exabytes on a crafted entry.
MAX_FILE_OFFSET = 1 << 48
# Data bytes a data sector holds: bytes 8..4091 of the 4 KiB update (2.3.1.4).
DATA_BYTES = 4084

SIG_ENTRY = b"loge"
SIG_ZERO = b"zero"
SIG_DESC = b"desc"
SIG_DATA = b"data"


# --------------------------------------------------------------------------
# On-disk structures
# --------------------------------------------------------------------------

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


@dataclass
class LogEntryHeader:
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

    @classmethod
    def parse(cls, buf, offset: int = 0) -> "LogEntryHeader":
        (sig, crc, length, tail, seq, count, res, guid, flushed,
         last) = _ENTRY.unpack_from(buf, offset)
        return cls(length, tail, seq, count, guid, flushed, last, crc, res, sig)

    def pack(self) -> bytes:
        return _ENTRY.pack(self.signature, self.checksum, self.entry_length, self.tail,
                           self.sequence_number, self.descriptor_count, self.reserved,
                           self.log_guid, self.flushed_file_offset, self.last_file_offset)


@dataclass
class ZeroDescriptor:
    file_offset: int = 0
    zero_length: int = 0
    sequence_number: int = 0
    reserved: int = 0
    signature: bytes = SIG_ZERO

    @classmethod
    def parse(cls, buf, offset: int = 0) -> "ZeroDescriptor":
        sig, res, length, off, seq = _ZERO.unpack_from(buf, offset)
        return cls(off, length, seq, res, sig)

    def pack(self) -> bytes:
        return _ZERO.pack(self.signature, self.reserved, self.zero_length,
                          self.file_offset, self.sequence_number)


@dataclass
class DataDescriptor:
    file_offset: int = 0
    leading_bytes: bytes = bytes(8)
    trailing_bytes: bytes = bytes(4)
    sequence_number: int = 0
    signature: bytes = SIG_DESC

    @classmethod
    def parse(cls, buf, offset: int = 0) -> "DataDescriptor":
        sig, trailing, leading, off, seq = _DESC.unpack_from(buf, offset)
        return cls(off, leading, trailing, seq, sig)

    def pack(self) -> bytes:
        return _DESC.pack(self.signature, self.trailing_bytes, self.leading_bytes,
                          self.file_offset, self.sequence_number)


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


# --------------------------------------------------------------------------
# Scanning the ring (2.3.2, 2.3.3)
# --------------------------------------------------------------------------

class _Ring:
    """Reads of the log ring with wrap-around; caches the whole ring when small."""

    CACHE_LIMIT = 64 * MiB

    def __init__(self, file, log_offset: int, log_length: int) -> None:
        self.file, self.offset, self.length = file, log_offset, log_length
        self.cache = file.pread(log_offset, log_length) if log_length <= self.CACHE_LIMIT else None

    def read(self, pos: int, nbytes: int) -> bytes:
        # Callers never ask for more than the ring (entry_length <= log_length).
        out = bytearray()
        while nbytes:
            n = min(nbytes, self.length - pos)
            if self.cache is not None:
                out += self.cache[pos:pos + n]
            else:
                out += self.file.pread(self.offset + pos, n)
            nbytes -= n
            pos = 0
        return bytes(out)


class _Budget:
    """Caps scan work so a crafted ring cannot make the scan quadratic forever.

    A sane log needs about two passes over the ring; allow many more.
    """

    def __init__(self, log_length: int) -> None:
        self.left = 64 * log_length + 256 * MiB

    def spend(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise CorruptImageError("VHDX log scan exceeds its work bound (crafted log?)")


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


@dataclass
class LogSequence:
    """The active sequence: entries from the tail entry to the head, in order."""

    entries: list[LogEntry]

    @property
    def head(self) -> LogEntry:
        return self.entries[-1]

    @property
    def sequence_number(self) -> int:
        return self.head.sequence_number


def find_active_sequence(file, log_offset: int, log_length: int, log_guid: bytes
                         ) -> LogSequence | None:
    """Spec 2.3.3 steps 1-7: the valid sequence with the highest head sequence number.

    Returns None when no valid sequence exists.  Each ring position is parsed
    at most once (cached); total checksum work is capped by :class:`_Budget`.
    """
    if log_length <= 0 or log_length % SECTOR or log_offset % SECTOR:
        raise CorruptImageError("VHDX log offset or length is not 4 KiB aligned")
    if log_offset + log_length > file.getlength():
        raise CorruptImageError("VHDX log lies beyond the end of the file")
    ring = _Ring(file, log_offset, log_length)
    budget = _Budget(log_length)
    cache: dict[int, LogEntry | None] = {}

    def entry_at(pos: int) -> LogEntry | None:
        if pos not in cache:
            cache[pos] = read_entry(ring, pos, log_guid, budget)
        return cache[pos]

    best: list[LogEntry] | None = None
    tail = old_tail = 0
    while True:
        current: list[LogEntry] = []
        pos, used = tail, 0
        while True:
            e = entry_at(pos)
            # A sequence can never be longer than the ring; this also stops a
            # chain of entries that would otherwise lap its own start.
            if (e is None or used + e.header.entry_length > log_length
                    or (current and e.sequence_number != current[-1].sequence_number + 1)):
                break
            current.append(e)
            used += e.header.entry_length
            pos = (pos + e.header.entry_length) % log_length
            budget.spend(64)
        valid = False
        if current:
            # Step 4: the head's tail must be one of the sequence's entries; the
            # active sequence starts there (older entries were already applied).
            positions = [e.position for e in current]
            if current[-1].header.tail in positions:
                valid = True
                current = current[positions.index(current[-1].header.tail):]
                if best is None or current[-1].sequence_number > best[-1].sequence_number:
                    best = current
        # Step 6: skip past a valid sequence, otherwise advance one sector.
        tail = pos if valid else (tail + SECTOR) % log_length
        # Step 7: once the scan wraps, the whole ring has been seen.
        if tail <= old_tail:
            break
        old_tail = tail
    return LogSequence(best) if best else None


# --------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------

def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass
class ReplayOverlay:
    """The file as it would be after replay, without touching it.

    ``sectors`` maps 4 KiB-aligned file offsets to their replayed 4 KiB;
    ``zeros`` holds sorted, merged ``(start, end)`` ranges replayed as zeros
    (a sector in ``sectors`` always wins: it was written after any zeroing).
    ``length`` is the file length after replay.
    """

    sequence: LogSequence
    length: int
    sectors: dict[int, bytes] = field(default_factory=dict)
    zeros: list[tuple[int, int]] = field(default_factory=list)

    def _zero_overlaps(self, start: int, end: int) -> Iterable[tuple[int, int]]:
        i = max(bisect.bisect_right(self.zeros, (start, MAX_FILE_OFFSET + 1)) - 1, 0)
        for zs, ze in self.zeros[i:]:
            if zs >= end:
                break
            if ze > start:
                yield max(zs, start), min(ze, end)

    def pread(self, file, offset: int, nbytes: int) -> bytes:
        """Read ``file`` as replayed; bytes past the real end of file read as zeros."""
        base_len = file.getlength()
        buf = bytearray(nbytes)
        if offset < base_len:
            n = min(nbytes, base_len - offset)
            buf[:n] = file.pread(offset, n)
        end = offset + nbytes
        for zs, ze in self._zero_overlaps(offset, end):
            buf[zs - offset:ze - offset] = bytes(ze - zs)
        first, last = offset - offset % SECTOR, end
        if (last - first) // SECTOR <= len(self.sectors):
            keys: Iterable[int] = range(first, last, SECTOR)
        else:
            keys = sorted(k for k in self.sectors if first <= k < last)
        for k in keys:
            data = self.sectors.get(k)
            if data is not None:
                lo, hi = max(k, offset), min(k + SECTOR, end)
                buf[lo - offset:hi - offset] = data[lo - k:hi - k]
        return bytes(buf)


def _check_header_fields(log_offset: int, log_length: int, log_version: int = 0) -> None:
    if log_version != 0:
        raise UnsupportedError(f"VHDX log version {log_version} is not supported")
    if log_offset < MiB or log_offset % MiB or log_length % MiB:
        raise CorruptImageError("VHDX log offset or length is not 1 MiB aligned")


def _load_sequence(file, header) -> LogSequence | None:
    """None for an empty log; the active sequence otherwise; corrupt if none is valid."""
    log_guid = bytes(header.log_guid)
    if log_guid == ZERO_GUID or header.log_length == 0:
        return None
    _check_header_fields(header.log_offset, header.log_length,
                         getattr(header, "log_version", 0))
    seq = find_active_sequence(file, header.log_offset, header.log_length, log_guid)
    if seq is None:
        # Spec 2.3.3 says the file is corrupt; qemu 7.2 silently opens it.
        raise CorruptImageError("VHDX header has a log GUID but the log has no valid entries")
    if seq.head.header.flushed_file_offset > file.getlength():
        raise CorruptImageError("VHDX file is shorter than the log's flushed file offset "
                                "(the file was truncated)")
    return seq


def replay_log_in_memory(file, header) -> ReplayOverlay | None:
    """Replay into a :class:`ReplayOverlay` for read-only opens; writes nothing.

    ``header`` is any object with ``log_guid``, ``log_offset``, ``log_length``
    (and optionally ``log_version``), e.g. the current ``header.Header``.
    Returns None when the log is empty (LogGuid zero).
    """
    seq = _load_sequence(file, header)
    if seq is None:
        return None
    ov = ReplayOverlay(seq, file.getlength())
    for entry in seq.entries:
        for item in entry.descriptors:
            if isinstance(item, ZeroDescriptor):
                start, end = item.file_offset, item.file_offset + item.zero_length
                if (end - start) // SECTOR < len(ov.sectors):
                    doomed: Iterable[int] = range(start, end, SECTOR)
                else:
                    doomed = [k for k in ov.sectors if start <= k < end]
                for k in doomed:
                    ov.sectors.pop(k, None)
                if end == start:
                    continue            # qemu writes nothing for a zero-length range
                ov.zeros.append((start, end))
            else:
                desc, data = item
                ov.sectors[desc.file_offset] = data
                end = desc.file_offset + SECTOR
            ov.length = max(ov.length, end)
        # qemu and the spec: the file must hold everything up to LastFileOffset;
        # extend (1 MiB rounded) only when it is short.
        last = entry.header.last_file_offset
        if ov.length < last:
            ov.length = _round_up(last, MiB)
    ov.zeros = _merge(ov.zeros)
    return ov


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _write_zeros(file, start: int, end: int) -> None:
    """Zero ``[start, end)``: real zeros inside the file, extension beyond it."""
    cur = file.getlength()
    chunk = bytes(min(MiB, max(end - start, 0)))
    pos = start
    while pos < min(end, cur):
        n = min(len(chunk), min(end, cur) - pos)
        file.pwrite(pos, chunk[:n])
        pos += n
    if end > cur:
        if start > cur:
            file.truncate(start)
        file.truncate(end)              # extension reads back as zeros


def replay_log(file, header) -> LogSequence | None:
    """Replay the active sequence into ``file`` (spec 2.3.3), then flush.

    Returns the replayed sequence (None if the log was empty) so the driver can
    continue numbering at ``head.sequence_number + 1`` as qemu does.  The caller
    must have updated the headers' FileWriteGuid/DataWriteGuid first and must
    clear the header LogGuid afterwards (see :class:`LogWriter` docs).
    """
    ov = replay_log_in_memory(file, header)
    if ov is None:
        return None
    apply_overlay(file, ov)
    return ov.sequence


def apply_overlay(file, ov: ReplayOverlay) -> None:
    """Write a computed replay to ``file``: zeros first, then sectors, extend, flush.

    Zero ranges only survive where no later data descriptor wrote, so this
    order gives the same bytes as applying descriptors one by one.
    """
    try:
        for start, end in ov.zeros:
            _write_zeros(file, start, end)
        for off in sorted(ov.sectors):
            if off + SECTOR > file.getlength():
                file.truncate(off + SECTOR)  # don't rely on writes past EOF growing it
            file.pwrite(off, ov.sectors[off])
        if file.getlength() < ov.length:
            file.truncate(ov.length)
        file.flush()
    except OSError as exc:              # plain-file adapters
        raise BlockIOError(f"VHDX log replay failed: {exc}") from exc


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def merge_sectors(file, offset: int, data: bytes) -> list[tuple[int, bytes]]:
    """The 4 KiB sectors covering ``[offset, offset + len(data))``, as qemu logs them.

    Partial sectors at either end are completed with the file's current bytes
    (qemu 7.2 reads the missing head or tail from the file); bytes past end of
    file read as zero.
    """
    out: list[tuple[int, bytes]] = []
    end = offset + len(data)
    flen = file.getlength()
    first = offset - offset % SECTOR
    for sec in range(first, end, SECTOR):
        lo, hi = max(sec, offset), min(sec + SECTOR, end)
        if lo == sec and hi == sec + SECTOR:
            buf = bytes(data[sec - offset:sec - offset + SECTOR])
        else:
            cur = bytearray(SECTOR)
            if sec < flen:
                n = min(SECTOR, flen - sec)
                cur[:n] = file.pread(sec, n)
            cur[lo - sec:hi - sec] = data[lo - offset:hi - offset]
            buf = bytes(cur)
        out.append((sec, buf))
    return out


class LogWriter:
    """Writer state of one open image (qemu's ``s->log``): position, tail, sequence.

    One instance per read-write open.  Start at ``position=0``, ``sequence=1``;
    after an open-time replay use ``sequence=replayed.sequence_number + 1``.

    Journaled metadata update (:meth:`write_and_flush`).  The bytes that end
    up on disk are exactly qemu 7.2's; the order differs in one place for
    crash safety: qemu sets the header LogGuid *before* writing the entry, so
    a power cut in between leaves a LogGuid naming no valid entry, which the
    spec (2.3.3) calls a corrupt file.  We write and flush the entry first:

    1. flush the file (guest data / new blocks stable before the log names them)
    2. read the current bytes of partial sectors; build the entry with
       flushed = last = file length now
    3. write the entry sector by sector into the ring, wrapping at its end
    4. flush
    5. ``set_log_guid(new_guid)``: driver rewrites the headers with LogGuid set
       (both headers, each write + flush) -- from here a crash replays the entry
    6. write each 4 KiB sector to its final location, flush
    7. ``set_log_guid(ZERO_GUID)``: driver rewrites the headers with LogGuid clear
    """

    def __init__(self, log_offset: int, log_length: int, *, sequence: int = 1,
                 position: int = 0) -> None:
        if log_length < MiB or log_length % MiB or position % SECTOR or position >= log_length:
            raise InvalidArgumentError("invalid VHDX log geometry")
        self.log_offset, self.log_length = log_offset, log_length
        self.position = position        # where the next entry starts
        self.tail = position            # oldest unapplied entry (always the next one)
        self.sequence = sequence or 1

    def write_entry(self, file, entry: bytes) -> int:
        """Write a built entry at the ring position; returns where it went."""
        nsec = len(entry) // SECTOR
        # qemu keeps one sector open between head and tail, so an entry may
        # take at most all but one sector of the ring.
        if nsec >= self.log_length // SECTOR:
            raise InvalidArgumentError("VHDX log entry does not fit in the log")
        start = pos = self.position
        for i in range(nsec):
            file.pwrite(self.log_offset + pos, entry[i * SECTOR:(i + 1) * SECTOR])
            pos = (pos + SECTOR) % self.log_length
        self.position = self.tail = pos
        self.sequence = (self.sequence + 1) & 0xFFFFFFFFFFFFFFFF or 1
        return start

    def write_and_flush(self, file, offset: int, data: bytes,
                        set_log_guid: Callable[[bytes], None],
                        new_guid: bytes | None = None) -> LogEntry:
        """Journal ``data`` at file ``offset`` (steps 1-7 in the class docs)."""
        if len(data) > self.log_length:
            raise InvalidArgumentError("VHDX log write larger than the log")
        file.flush()
        return self._journal(file, merge_sectors(file, offset, data), (), set_log_guid,
                             new_guid)

    def entry_fits(self, data_sectors: int, descriptors: int) -> bool:
        """Whether one entry with these counts fits the ring (see write_entry)."""
        nsec = descriptor_sectors(descriptors) + data_sectors
        return nsec < self.log_length // SECTOR

    def write_sectors_and_flush(self, file, updates: list[tuple[int, bytes]],
                                set_log_guid: Callable[[bytes], None], *,
                                zeros: Iterable[tuple[int, int]] = (),
                                new_guid: bytes | None = None) -> LogEntry:
        """Journal several updates as ONE entry (atomic on replay), same steps
        as :meth:`write_and_flush`: ``updates`` are ``(file_offset, 4 KiB)``
        pairs, ``zeros`` ``(file_offset, length)`` ranges (4 KiB multiples)
        applied before the data sectors, as replay does."""
        file.flush()
        return self._journal(file, updates, list(zeros), set_log_guid, new_guid)

    def _journal(self, file, updates, zeros, set_log_guid, new_guid) -> LogEntry:
        """Steps 2-7, once step 1's flush is done."""
        guid = new_guid if new_guid is not None else uuid.uuid4().bytes
        size = file.getlength()
        seq = self.sequence
        entry = build_entry(seq, guid, self.tail, updates, zeros=zeros,
                            flushed_file_offset=size, last_file_offset=size)
        pos = self.write_entry(file, entry)
        file.flush()
        set_log_guid(guid)
        for off, length in zeros:
            _write_zeros(file, off, off + length)
        for off, sector in updates:
            file.pwrite(off, sector)
        file.flush()
        set_log_guid(ZERO_GUID)
        return LogEntry(pos, LogEntryHeader.parse(entry),
                        [ZeroDescriptor(off, n, seq) for off, n in zeros]
                        + [split_sector(s, off, seq)[0] for off, s in updates])


def log_entry_mask(entry: bytes) -> list[tuple[int, int]]:
    """Byte ranges of an entry that differ between two identical qemu runs.

    For the normalizer: the checksum (4..8), the LogGuid (32..48) and the
    unused tail of the descriptor sectors (uninitialised memory in qemu).
    Offsets are relative to the entry start (wrap modulo the log yourself).
    """
    hdr = LogEntryHeader.parse(entry)
    nd = descriptor_sectors(hdr.descriptor_count)
    return [(4, 8), (32, 48), (64 + 32 * hdr.descriptor_count, nd * SECTOR)]


__all__ = [
    "LogEntryHeader", "ZeroDescriptor", "DataDescriptor", "DataSector", "LogEntry",
    "LogSequence", "ReplayOverlay", "LogWriter", "build_entry", "read_entry",
    "find_active_sequence", "replay_log", "replay_log_in_memory", "apply_overlay",
    "merge_sectors", "split_sector", "join_sector", "descriptor_sectors",
    "log_entry_mask", "ZERO_GUID", "SECTOR",
]

