"""Finding the active log sequence in the ring (MS-VHDX v6.0, 2.3.2; 2.3.3 steps 1-7).

The log is a ring of 4 KiB sectors at ``log_offset``; entries may straddle its
end, so every read here goes sector by sector modulo ``log_length``.  A
sequence is a run of valid entries with consecutive sequence numbers whose
head names one of them as its tail; the active one has the highest head.
"""

from __future__ import annotations

from blockdrv._startup import dataclass

from blockdrv.errors import CorruptImageError

from ..constants import MiB
from .entry import SECTOR, LogEntry, read_entry


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
