"""Writing the log (MS-VHDX v6.0, 2.3): one journaled metadata update per entry.

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
"""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING

from blockdrv.errors import InvalidArgumentError

from .. import constants
from ..constants import ZERO_GUID, MiB
from .entry import (SECTOR, LogEntry, LogEntryHeader, ZeroDescriptor, build_entry,
                    descriptor_sectors, split_sector)
from ..aio import as_async, as_async_callback, blocking
from .replay import co_write_zeros

if TYPE_CHECKING:
    from typing import Awaitable, Callable, Iterable


async def co_merge_sectors(file, offset: int, data: bytes) -> list[tuple[int, bytes]]:
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
                cur[:n] = await file.co_pread(sec, n)
            cur[lo - sec:hi - sec] = data[lo - offset:hi - offset]
            buf = bytes(cur)
        out.append((sec, buf))
    return out


def merge_sectors(file, offset: int, data: bytes) -> list[tuple[int, bytes]]:
    """:func:`co_merge_sectors` for synchronous callers (any file object)."""
    return blocking(co_merge_sectors(as_async(file), offset, data))


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

    # Every method has an awaitable form (``co_*``, what the driver uses: its
    # ``file`` may suspend) and a synchronous one for plain file objects.

    async def co_write_entry(self, file, entry: bytes) -> int:
        """Write a built entry at the ring position; returns where it went."""
        nsec = len(entry) // SECTOR
        # qemu keeps one sector open between head and tail, so an entry may
        # take at most all but one sector of the ring.
        if nsec >= self.log_length // SECTOR:
            raise InvalidArgumentError("VHDX log entry does not fit in the log")
        start = pos = self.position
        for i in range(nsec):
            await file.co_pwrite(self.log_offset + pos, entry[i * SECTOR:(i + 1) * SECTOR])
            pos = (pos + SECTOR) % self.log_length
        self.position = self.tail = pos
        self.sequence = (self.sequence + 1) & 0xFFFFFFFFFFFFFFFF or 1
        return start

    async def co_write_and_flush(self, file, offset: int, data: bytes,
                                 set_log_guid: Callable[[bytes], Awaitable[None]],
                                 new_guid: bytes | None = None) -> LogEntry:
        """Journal ``data`` at file ``offset`` (steps 1-7 in the class docs)."""
        if len(data) > self.log_length:
            raise InvalidArgumentError("VHDX log write larger than the log")
        await file.co_flush()
        updates = await co_merge_sectors(file, offset, data)
        return await self._journal(file, updates, (), set_log_guid, new_guid)

    def entry_fits(self, data_sectors: int, descriptors: int) -> bool:
        """Whether one entry with these counts fits the ring (see write_entry)."""
        nsec = descriptor_sectors(descriptors) + data_sectors
        return nsec < self.log_length // SECTOR

    async def co_write_sectors_and_flush(self, file, updates: list[tuple[int, bytes]],
                                         set_log_guid: Callable[[bytes], Awaitable[None]], *,
                                         zeros: Iterable[tuple[int, int]] = (),
                                         new_guid: bytes | None = None) -> LogEntry:
        """Journal several updates as ONE entry (atomic on replay), same steps
        as :meth:`co_write_and_flush`: ``updates`` are ``(file_offset, 4 KiB)``
        pairs, ``zeros`` ``(file_offset, length)`` ranges (4 KiB multiples)
        applied before the data sectors, as replay does."""
        await file.co_flush()
        return await self._journal(file, updates, list(zeros), set_log_guid, new_guid)

    async def _journal(self, file, updates, zeros, set_log_guid, new_guid) -> LogEntry:
        """Steps 2-7, once step 1's flush is done."""
        guid = new_guid if new_guid is not None else constants.new_guid()
        size = file.getlength()
        seq = self.sequence
        entry = build_entry(seq, guid, self.tail, updates, zeros=zeros,
                            flushed_file_offset=size, last_file_offset=size)
        pos = await self.co_write_entry(file, entry)
        await file.co_flush()
        await set_log_guid(guid)
        for off, length in zeros:
            await co_write_zeros(file, off, off + length)
        for off, sector in updates:
            await file.co_pwrite(off, sector)
        await file.co_flush()
        await set_log_guid(ZERO_GUID)
        return LogEntry(pos, LogEntryHeader.parse(entry),
                        [ZeroDescriptor(off, n, seq) for off, n in zeros]
                        + [split_sector(s, off, seq)[0] for off, s in updates])

    # -- synchronous forms (plain file objects, synchronous header callbacks)

    def write_entry(self, file, entry: bytes) -> int:
        return blocking(self.co_write_entry(as_async(file), entry))

    def write_and_flush(self, file, offset: int, data: bytes,
                        set_log_guid: Callable[[bytes], None],
                        new_guid: bytes | None = None) -> LogEntry:
        return blocking(self.co_write_and_flush(as_async(file), offset, data,
                                                as_async_callback(set_log_guid), new_guid))


def log_entry_mask(entry: bytes) -> list[tuple[int, int]]:
    """Byte ranges of an entry that differ between two identical qemu runs.

    For the normalizer: the checksum (4..8), the LogGuid (32..48) and the
    unused tail of the descriptor sectors (uninitialised memory in qemu).
    Offsets are relative to the entry start (wrap modulo the log yourself).
    """
    hdr = LogEntryHeader.parse(entry)
    nd = descriptor_sectors(hdr.descriptor_count)
    return [(4, 8), (32, 48), (64 + 32 * hdr.descriptor_count, nd * SECTOR)]

