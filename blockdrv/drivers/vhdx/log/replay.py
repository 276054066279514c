"""Log replay (MS-VHDX v6.0, 2.3.3): the active sequence applied to the file.

:func:`replay_log_in_memory` computes the replayed file as a
:class:`ReplayOverlay` (read-only opens read through it);
:func:`apply_overlay` writes one to the file; :func:`replay_log` does both.
"""

from __future__ import annotations

import bisect
from blockdrv._startup import TYPE_CHECKING, dataclass, field

from blockdrv.errors import BlockDriverError, BlockIOError, CorruptImageError, UnsupportedError

from ..constants import ZERO_GUID, MiB, round_up
from .entry import MAX_FILE_OFFSET, SECTOR, ZeroDescriptor
from .sequence import LogSequence, find_active_sequence

if TYPE_CHECKING:
    from typing import Iterable


class LogWithoutEntriesError(CorruptImageError):
    """The header names a log (LogGuid) but no valid entry carries that GUID:
    nothing was journaled under it, so nothing was changed by it either."""


@dataclass
class ReplayOverlay:
    """The file as it would be after replay, without touching it.

    ``sectors`` maps 4 KiB-aligned file offsets to their replayed 4 KiB;
    ``zeros`` holds sorted, merged ``(start, end)`` ranges replayed as zeros
    (a sector in ``sectors`` always wins: it was written after any zeroing).
    ``length`` is the file length after replay.

    ``last_file_offset`` is the largest LastFileOffset of the sequence: the
    file must be at least that long after replay (2.3.3) -- but a damaged
    entry can name anything up to 2^48, so the file only grows towards it as
    far as something references (:meth:`bound`).  ``capped`` tells that the
    bound cut the growth short.
    """

    sequence: LogSequence
    length: int
    sectors: dict[int, bytes] = field(default_factory=dict)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    last_file_offset: int = 0
    base_length: int = 0        # length from the file and the descriptors alone
    capped: bool = False

    def bound(self, referenced_end: int | None) -> None:
        """Grow ``length`` to LastFileOffset (1 MiB rounded, as qemu rounds)
        but not past ``referenced_end`` -- the end of the furthest structure or
        block the image references (None: no bound).  May be called again
        with a larger bound once more of the image is known."""
        want = round_up(self.last_file_offset, MiB)
        length = self.base_length
        if want > length:
            limit = want if referenced_end is None else max(min(want, referenced_end), length)
            self.capped = limit < want
            length = limit
        self.length = max(self.length, length)

    def _zero_overlaps(self, start: int, end: int) -> Iterable[tuple[int, int]]:
        i = max(bisect.bisect_right(self.zeros, (start, MAX_FILE_OFFSET + 1)) - 1, 0)
        for zs, ze in self.zeros[i:]:
            if zs >= end:
                break
            if ze > start:
                yield max(zs, start), min(ze, end)

    def pread(self, file, offset: int, nbytes: int) -> bytes:
        """Read ``file`` (synchronous) as replayed; bytes past the real end of
        file read as zeros."""
        buf = bytearray(nbytes)
        n = min(nbytes, max(file.getlength() - offset, 0))
        if n:
            buf[:n] = file.pread(offset, n)
        return self._replayed(buf, offset)

    async def co_pread(self, file, offset: int, nbytes: int) -> bytes:
        """:meth:`pread` through an awaitable file (guest reads)."""
        buf = bytearray(nbytes)
        n = min(nbytes, max(file.getlength() - offset, 0))
        if n:
            buf[:n] = await file.co_pread(offset, n)
        return self._replayed(buf, offset)

    def _replayed(self, buf: bytearray, offset: int) -> bytes:
        """``buf``, the file's bytes at ``offset``, with the replay applied."""
        end = offset + len(buf)
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
        raise LogWithoutEntriesError(
            "VHDX header has a log GUID but the log has no valid entries")
    if seq.head.header.flushed_file_offset > file.getlength():
        raise CorruptImageError("VHDX file is shorter than the log's flushed file offset "
                                "(the file was truncated)")
    return seq


def replay_log_in_memory(file, header, referenced_end: int | None = None
                         ) -> ReplayOverlay | None:
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
        ov.last_file_offset = max(ov.last_file_offset, entry.header.last_file_offset)
    ov.zeros = _merge(ov.zeros)
    # the spec: the file must hold everything up to LastFileOffset; extend
    # (1 MiB rounded) only when it is short, and only as far as allowed
    ov.base_length = ov.length
    ov.bound(referenced_end)
    return ov


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


async def co_write_zeros(file, start: int, end: int) -> None:
    """Zero ``[start, end)``: real zeros inside the file, extension beyond it."""
    cur = file.getlength()
    chunk = bytes(min(MiB, max(end - start, 0)))
    pos = start
    while pos < min(end, cur):
        n = min(len(chunk), min(end, cur) - pos)
        await file.co_pwrite(pos, chunk[:n])
        pos += n
    if end > cur:
        if start > cur:
            await file.co_truncate(start)
        await file.co_truncate(end)     # extension reads back as zeros


def replay_log(file, header, referenced_end: int | None = None) -> LogSequence | None:
    """Replay the active sequence into ``file`` (spec 2.3.3), then flush.

    Returns the replayed sequence (None if the log was empty) so the driver can
    continue numbering at ``head.sequence_number + 1`` as qemu does.  The caller
    must have updated the headers' FileWriteGuid/DataWriteGuid first and must
    clear the header LogGuid afterwards (see :class:`LogWriter` docs).
    """
    ov = replay_log_in_memory(file, header, referenced_end)
    if ov is None:
        return None
    apply_overlay(file, ov)
    return ov.sequence


def apply_overlay(file, ov: ReplayOverlay) -> None:
    """:func:`co_apply_overlay` for synchronous callers (any file object)."""
    from ..aio import as_async, blocking
    blocking(co_apply_overlay(as_async(file), ov))


async def co_apply_overlay(file, ov: ReplayOverlay) -> None:
    """Write a computed replay to ``file``: zeros first, then sectors, extend, flush.

    Zero ranges only survive where no later data descriptor wrote, so this
    order gives the same bytes as applying descriptors one by one.
    """
    try:
        for start, end in ov.zeros:
            await co_write_zeros(file, start, end)
        for off in sorted(ov.sectors):
            if off + SECTOR > file.getlength():
                await file.co_truncate(off + SECTOR)  # don't rely on writes past EOF growing it
            await file.co_pwrite(off, ov.sectors[off])
        if file.getlength() < ov.length:
            await file.co_truncate(ov.length)
        await file.co_flush()
    except BlockDriverError:
        raise                           # the node's own error, class and errno kept
    except OSError as exc:              # plain-file adapters
        raise BlockIOError(f"VHDX log replay failed: {exc}") from exc
