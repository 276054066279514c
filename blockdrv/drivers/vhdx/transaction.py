"""One journaled metadata update (spec 2.3): the only way metadata changes.

Every change of a live VHDX structure -- BAT entries, sector bitmap bits,
the region tables and metadata of a resize, repairs -- is made as one
transaction, so that after a power cut the image shows all of it or none::

    async with img.transaction() as tx:      # img.lock held by the caller
        tx.set_bat(index, raw_entry)          # in the log now, in memory at commit
        tx.write(bitmap_offset, new_bits)     # any bytes, merged into 4 KiB sectors
        tx.on_commit(lambda: cache.update(...))

On leaving the block without an exception, :meth:`Transaction.commit`:

1. collects the 4 KiB sectors: the BAT sectors holding the changed entries
   (read from the file, patched; in file order), then every other update in
   the order it was given, partial sectors completed with the file's bytes;
2. has the log writer flush the file (guest data and new blocks are stable
   before the log names them), write the entry, flush, set the header
   LogGuid, write the sectors in place, flush, clear the LogGuid
   (:class:`.log.LogWriter`);
3. publishes the in-memory state -- BAT entries and ``on_commit`` callbacks,
   in the order they were given -- only once the entry is durable: until
   then concurrent lock-free readers see the old state, and a failed
   transaction leaves nothing to revert.

Byte for byte the log entry is the one qemu-img 7.2 writes for the same
update (one data descriptor per sector, see :mod:`.log.writer`); a lone BAT
entry or byte range goes through ``LogWriter.co_write_and_flush`` as qemu's
vhdx_log_write_and_flush does, anything larger through
``co_write_sectors_and_flush`` as one entry.
"""

from __future__ import annotations

import struct
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Callable

from .constants import LOG_SECTOR_SIZE

_U64 = struct.Struct("<Q")
_ZERO_SECTOR = bytes(LOG_SECTOR_SIZE)


class Transaction:
    def __init__(self, file, writer, headers, bat, bat_offset: int) -> None:
        self._file = file
        self._writer = writer
        self._headers = headers
        self._bat = bat
        self._bat_offset = bat_offset
        self._entries: dict[int, int] = {}          # BAT index -> raw entry
        self._pieces: list[tuple[str, object, object]] = []
        self._zeros: list[tuple[int, int]] = []
        self._publish: list[Callable[[], None]] = []

    # -- building -------------------------------------------------------------

    def set_bat(self, index: int, value: int) -> None:
        """BAT entry ``index`` becomes ``value`` (raw, state in the low bits)."""
        self._entries[index] = value
        bat = self._bat
        self._publish.append(lambda: bat.set_raw_at(index, value))

    def write(self, offset: int, data: bytes) -> None:
        """Metadata bytes at a file offset (sector bitmaps, repaired tables)."""
        self._pieces.append(("bytes", offset, bytes(data)))

    def write_sectors(self, updates: list[tuple[int, bytes]]) -> None:
        """Whole 4 KiB sectors, as given (a resize's computed sector diffs)."""
        self._pieces.append(("sectors", list(updates), None))

    def zero(self, ranges: list[tuple[int, int]]) -> None:
        """``(offset, length)`` ranges journaled as zero descriptors."""
        self._zeros += ranges

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the entry is durable (publish a cache, a size)."""
        self._publish.append(fn)

    # -- committing -----------------------------------------------------------

    async def __aenter__(self) -> "Transaction":
        return self

    async def __aexit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            await self.commit()

    async def commit(self) -> None:
        if not (self._entries or self._pieces or self._zeros):
            return
        file, writer = self._file, self._writer
        set_guid = self._headers.co_set_log_guid
        lone = self._lone_range()
        if lone is not None:
            await writer.co_write_and_flush(file, lone[0], lone[1], set_guid)
        else:
            await writer.co_write_sectors_and_flush(file, await self._sectors(), set_guid,
                                                    zeros=self._zeros)
        for fn in self._publish:
            fn()

    def _lone_range(self):
        """(offset, bytes) when the update is one BAT entry or one byte range."""
        if self._zeros or len(self._entries) + len(self._pieces) != 1:
            return None
        if self._entries:
            (index, value), = self._entries.items()
            return self._bat_offset + index * 8, _U64.pack(value)
        kind, offset, data = self._pieces[0]
        return (offset, data) if kind == "bytes" else None

    async def _sectors(self) -> list[tuple[int, bytes]]:
        from .log import co_merge_sectors
        file = self._file
        by_sector: dict[int, bytearray] = {}
        for index in sorted(self._entries):
            off = self._bat_offset + index * 8
            sec = off - off % LOG_SECTOR_SIZE
            buf = by_sector.get(sec)
            if buf is None:
                buf = by_sector[sec] = bytearray(await file.co_pread(sec, LOG_SECTOR_SIZE))
            _U64.pack_into(buf, off - sec, self._entries[index])
        out = [(sec, bytes(buf)) for sec, buf in by_sector.items()]
        for kind, a, b in self._pieces:
            if kind == "bytes":
                out += await co_merge_sectors(file, a, b)
            else:
                out += a
        return out


def sector_diff(base: int, old: bytes, new: bytes):
    """(data updates, zero ranges) turning the 4 KiB-aligned range at ``base``
    from ``old`` into ``new`` -- changed sectors only; all-zero ones as zero
    ranges (merged): for :meth:`Transaction.write_sectors` and
    :meth:`Transaction.zero` (a resize's BAT and region tables)."""
    updates, zeros = [], []
    for pos in range(0, len(new), LOG_SECTOR_SIZE):
        sec = new[pos:pos + LOG_SECTOR_SIZE]
        if sec == old[pos:pos + LOG_SECTOR_SIZE]:
            continue
        off = base + pos
        if sec == _ZERO_SECTOR:
            if zeros and zeros[-1][0] + zeros[-1][1] == off:
                zeros[-1] = (zeros[-1][0], zeros[-1][1] + LOG_SECTOR_SIZE)
            else:
                zeros.append((off, LOG_SECTOR_SIZE))
        else:
            updates.append((off, bytes(sec)))
    return updates, zeros


__all__ = ["Transaction", "sector_diff"]
