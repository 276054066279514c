"""One open VHDX image: open-time validation, guest reads and writes.

The order of operations follows qemu 7.2 so that the same qemu-io script
leaves byte-identical files with both tools (after normalizing GUIDs,
sequence numbers and checksums):

* open read-write: replay a pending log (spec 2.3.3), then rewrite both
  headers with a fresh FileWriteGuid (spec 2.2.2.1);
* first guest-visible write of the session: rewrite both headers with a new
  DataWriteGuid;
* writes to an unallocated block: extend the file to the next 1 MiB boundary
  plus one block, write only the guest's bytes, then journal the 4 KiB BAT
  sector through the log (log entry, flush, BAT sector, flush).

Lock discipline: ``self.lock`` (an asyncio.Lock; a flag for synchronous
callers, see :class:`blockdrv.coroutine.CoLock`) is held across every
metadata change -- BAT entry updates, allocation, header and log writes --
so concurrent writers to unallocated blocks cannot allocate twice or
interleave log entries.  Metadata I/O under the lock goes through the
synchronous API and never suspends; only the guest-data write of an
allocation is awaited while holding it.  Reads and in-place writes to
FULLY_PRESENT blocks take no lock: they read one BAT entry, which changes
atomically from "absent" to "present" -- and only once the BAT update is
journaled and flushed, so a write can never land in a block whose entry is
not yet durable (a later flush would otherwise return before the data is
reachable after a crash).  A read racing an allocation sees the old zeros;
a write racing it re-checks the entry under the lock and then writes in
place.  These rules are exercised by tests/reliability/test_concurrency.py.
"""

from __future__ import annotations

import errno
from types import MethodType
from typing import TYPE_CHECKING

from blockdrv.coroutine import CoLock
from blockdrv.errors import BlockDriverError, CorruptImageError
from blockdrv.iov import IOVector

from .bat import Bat, encode_entry, total_entries
from .constants import (ABSENT_STATES, ALIGNMENT, BAT_OFFSET_MASK, BAT_STATE_MASK,
                        FILE_SIGNATURE, HEADER1_OFFSET, HEADER2_OFFSET, HEADER_OFFSETS,
                        HEADER_SECTION_SIZE, HEADER_SIZE, PAYLOAD_BLOCK_FULLY_PRESENT,
                        PAYLOAD_BLOCK_PARTIALLY_PRESENT, REGION_TABLE1_OFFSET,
                        REGION_TABLE2_OFFSET, REGION_TABLE_SIZE, ZERO_GUID, new_guid,
                        round_up)
from .checksum import seal
from .header import FileIdentifier, Header, select_current_header
from .metadata import read_metadata
from .region import RegionTable

if TYPE_CHECKING:
    from . import log as vlog


class VHDXImage:
    """Driver state of one node (``bs.opaque``)."""

    def __init__(self, file, read_only: bool, check: bool = False) -> None:
        self.file = file                      # the protocol node (sync API)
        self.read_only = read_only
        # Opened by `check` (O_CHECK): BAT problems are reported by check,
        # not refused at open (qemu's BDRV_O_CHECK).
        self.check_mode = check
        self.lock = CoLock()
        self.headers: list[Header] = []
        self.curr_header = 0
        self.session_guid = new_guid()
        self.first_visible_write = True
        self.overlay: vlog.ReplayOverlay | None = None   # read-only log replay
        self.log_replayed_on_open = False
        # Found by open for check to report (see .check): the LogGuid of a
        # header whose log holds no valid entry (check mode only; other opens
        # refuse it), and (LastFileOffset, length) when replay grew the file
        # only to what the image references.
        self.log_guid_without_entries: bytes | None = None
        self.last_file_offset_cap: tuple[int, int] | None = None
        self.log_writer: vlog.LogWriter | None = None
        self.creator = ""
        # Differencing images (see .differencing, .parent, .bitmap): how to
        # read the parent's data (the node's co_read_backing: the core owns
        # the chain) and the sector bitmaps.  ``on_validated`` runs once the
        # image is validated and before open writes anything (the driver
        # names its parent there, and the core opens and checks it).
        self.differencing = False
        self.read_backing = None
        self.bitmaps = None
        self.on_validated = None

    # ------------------------------------------------------------------ open

    def _read(self, offset: int, nbytes: int) -> bytes:
        """Metadata read, through the in-memory replay when there is one."""
        if self.overlay is not None:
            return self.overlay.pread(self.file, offset, nbytes)
        length = self.file.getlength()
        if offset + nbytes > length:
            raise CorruptImageError(
                f"VHDX structure at offset {offset} lies beyond the end of the file")
        return bytes(self.file.pread(offset, nbytes))

    def _read_into(self, offset: int, nbytes: int):
        """Like :meth:`_read`, into one fresh writable buffer with a single preadv
        (the BAT: no bytes copy beside it)."""
        if self.overlay is not None:
            return bytearray(self.overlay.pread(self.file, offset, nbytes))
        if offset + nbytes > self.file.getlength():
            raise CorruptImageError(
                f"VHDX structure at offset {offset} lies beyond the end of the file")
        buf = _table_buffer(nbytes)
        if nbytes:
            self.file.preadv(offset, IOVector.from_buffer(buf))
        return buf

    def file_length(self) -> int:
        """The file's length, as replayed when a log is replayed only in memory."""
        return self.overlay.length if self.overlay is not None else self.file.getlength()

    def structure_spans(self) -> list[tuple[int, int]]:
        """(start, end) of the header section, then of the log and every
        region (those of non-zero length)."""
        return [(0, HEADER_SECTION_SIZE)] + [(s, s + n) for s, n in self.regions if n]

    def open(self) -> None:
        file = self.file
        if file.getlength() < HEADER_SECTION_SIZE:
            if bytes(file.pread(0, min(8, file.getlength()))) != FILE_SIGNATURE:
                raise CorruptImageError("Not a VHDX image: bad file signature")
            raise CorruptImageError("VHDX file is shorter than its header section")
        self.creator = FileIdentifier.parse(file.pread(0, 520)).creator
        h1 = file.pread(HEADER1_OFFSET, HEADER_SIZE)
        h2 = file.pread(HEADER2_OFFSET, HEADER_SIZE)
        self.curr_header, current = select_current_header(h1, h2)
        self.headers = [_parse_or(h1, current), _parse_or(h2, current)]
        sequence = 1
        # The log module (7 dataclasses) only when a log is pending or the
        # image is writable (_start_writing): a read-only open of a clean
        # image is the common case of info, map and convert sources.
        if current.has_log:
            from . import log as vlog
            # Replay into memory first, read-only or not: everything below is
            # validated on the image as it will be after replay, and a
            # read-write open writes nothing (headers, replay) until the whole
            # image passed validation.  Beyond qemu (which refuses), a
            # read-only open keeps the in-memory replay and writes nothing.
            # LastFileOffset is bounded by what the image references, known
            # only once the regions and the BAT are read (_bound_replay).
            try:
                self.overlay = vlog.replay_log_in_memory(file, current, referenced_end=0)
            except vlog.LogWithoutEntriesError:
                # Nothing was journaled under that GUID, so nothing changed:
                # check reports it and `-r all` clears the GUID (spec 2.3.3
                # calls the file corrupt, so every other open refuses it).
                if not self.check_mode:
                    raise
                self.log_guid_without_entries = bytes(current.log_guid)
        self._open_regions(current)
        ov = self.overlay
        if ov is not None and ov.capped:
            self.last_file_offset_cap = (ov.last_file_offset, ov.length)
        if self.on_validated is not None:
            self.on_validated(self)
        if not self.read_only and self.overlay is not None:
            replayed = self._replay_log(self.overlay)
            sequence = replayed.sequence_number + 1
        if not self.read_only:
            self._start_writing(sequence)

    def _start_writing(self, sequence: int = 1) -> None:
        """Become writable: a log writer numbering from ``sequence``, and both
        headers rewritten with the session's FileWriteGuid (spec 2.2.2.1)."""
        from . import log as vlog
        self.log_writer = vlog.LogWriter(self.header.log_offset, self.header.log_length,
                                         sequence=sequence)
        self.update_headers(False, None)

    def _replay_log(self, overlay: "vlog.ReplayOverlay"):
        # qemu marks the session's first user-visible write before replaying:
        # both headers get the session FileWriteGuid and a new DataWriteGuid.
        # The overlay was computed (and the image validated through it) by
        # open(); from here the file holds what the overlay showed.
        from . import log as vlog
        self._mark_data_write()
        vlog.apply_overlay(self.file, overlay)
        self.overlay = None
        self.update_headers(False, ZERO_GUID)
        self.log_replayed_on_open = True
        return overlay.sequence

    def _open_regions(self, header: Header) -> None:
        length = self.file_length()
        try:
            rt = RegionTable.parse(self._read(REGION_TABLE1_OFFSET, REGION_TABLE_SIZE))
        except CorruptImageError as first:
            # The two copies are identical by spec; fall back to the second.
            try:
                rt = RegionTable.parse(self._read(REGION_TABLE2_OFFSET, REGION_TABLE_SIZE))
            except CorruptImageError:
                raise first from None
        # A read-only check counts overlapping regions as corruptions; any
        # other open refuses them (writing the log or BAT could then
        # overwrite other metadata, so no repair is attempted either).
        self.region_overlaps: list[str] = []
        counting = self.check_mode and self.read_only
        log_end = header.log_offset + header.log_length
        regions_end = max([log_end] + [e.file_offset + e.length for e in rt.entries])
        length = self._bound_replay(regions_end, length)
        rt.validate(header.log_offset, header.log_length, file_size=length,
                    overlaps=self.region_overlaps if counting else None)
        if header.log_length and header.log_offset + header.log_length > length:
            raise CorruptImageError("VHDX log lies beyond the end of the file")
        self.region_table = rt
        meta = rt.metadata
        self.metadata_table, self.params = read_metadata(
            lambda off, n: self._read(meta.file_offset + off, n), meta.length,
            allow_differencing=True)
        p = self.params
        self.block_size = p.block_size
        self.logical_sector_size = p.logical_sector_size
        self.virtual_size = p.virtual_size
        self.fixed = p.leave_blocks_allocated
        bat_rt = rt.bat
        self.differencing = diff = p.has_parent
        entries = total_entries(p.virtual_size, p.block_size, p.logical_sector_size,
                                differencing=diff)
        if entries * 8 > bat_rt.length:
            raise CorruptImageError(
                f"VHDX BAT region ({bat_rt.length} bytes) is too small for "
                f"{entries} entries")
        self.bat_offset = bat_rt.file_offset
        self.bat = Bat(self._read_into(bat_rt.file_offset, entries * 8),
                       p.virtual_size, p.block_size, p.logical_sector_size,
                       differencing=diff)
        self.regions = [(header.log_offset, header.log_length),
                        (bat_rt.file_offset, bat_rt.length),
                        (meta.file_offset, meta.length)]
        self.regions += [(e.file_offset, e.length) for e in rt.entries
                         if e not in (bat_rt, meta)]
        if self.overlay is not None and self.overlay.capped:
            length = self._bound_replay(max(regions_end, self.bat.present_end()), length)
        if diff:
            from . import bitmap, differencing
            self.bitmaps = bitmap.SectorBitmaps(self)
            # guest I/O of differencing images, bound once (see .differencing)
            self.readv = MethodType(differencing.readv, self)
            self._write_blocks = MethodType(differencing.writev, self)
        # Like qemu: a present block overlapping the header, log or a region
        # is refused at open (reads would return metadata as guest data).
        if self.check_mode:
            return
        if diff:
            bitmap.open_check(self)
        # Only what open refuses, chunked: a full audit (Bat.check, now used
        # by tests only; `check` has its own in .check) allocates several
        # arrays the size of the table.
        in_meta, beyond = self.bat.open_check(length, self.regions)
        if in_meta is not None:
            raise CorruptImageError(
                f"VHDX BAT entry for block {in_meta} points into VHDX metadata")
        if beyond is not None:
            # As qemu: reads would return zeros for data the BAT says is there.
            block = beyond
            raise CorruptImageError(
                f"VHDX BAT entry for block {block} points after the end of the file "
                "(the image has probably been truncated)")

    def _bound_replay(self, referenced_end: int, length: int) -> int:
        """Let a pending replay grow the file towards LastFileOffset up to
        ``referenced_end``; returns the (replayed) file length."""
        if self.overlay is None or not self.overlay.capped:
            return length
        self.overlay.bound(referenced_end)
        return self.file_length()

    # --------------------------------------------------------------- headers

    @property
    def header(self) -> Header:
        return self.headers[self.curr_header]

    def update_header(self, new_data_guid: bool, log_guid: bytes | None) -> None:
        """Write the non-current header as the new current one (spec 2.2.2.1)."""
        idx = 1 - self.curr_header
        active, target = self.headers[self.curr_header], self.headers[idx]
        target.sequence_number = (active.sequence_number + 1) & ((1 << 64) - 1)
        target.file_write_guid = self.session_guid
        if new_data_guid:
            target.data_write_guid = new_guid()
        if log_guid is not None:
            target.log_guid = log_guid
        offset = HEADER_OFFSETS[idx]
        # Keep whatever the reserved bytes hold: the checksum covers them.
        buf = bytearray(self.file.pread(offset, HEADER_SIZE))
        packed = target.pack()
        buf[:80] = packed[:80]
        seal(buf)
        self.file.pwrite(offset, bytes(buf))
        self.file.flush()
        self.curr_header = idx

    def update_headers(self, new_data_guid: bool, log_guid: bytes | None) -> None:
        """Both headers, one after the other, so that both stay valid."""
        self.update_header(new_data_guid, log_guid)
        self.update_header(new_data_guid, log_guid)

    def _set_log_guid(self, guid: bytes) -> None:
        self.update_headers(False, guid)

    # ------------------------------------------------------------------- I/O

    def entry(self, block: int) -> int:
        return self.bat.raw(block)

    def _bad_state(self, block: int, state: int) -> BlockDriverError:
        if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            return CorruptImageError(
                f"VHDX block {block} is PARTIALLY_PRESENT in an image without a parent",
                errno=errno.EIO)
        return CorruptImageError(f"VHDX block {block} has invalid BAT state {state}",
                                 errno=errno.EIO)

    # readv and _write_blocks are those of dynamic and fixed images; a
    # differencing image binds .differencing's at open (_open_regions).

    async def readv(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        bsize = self.block_size
        done = 0
        while done < nbytes:
            pos = offset + done
            block, in_block = divmod(pos, bsize)
            n = min(bsize - in_block, nbytes - done)
            raw = self.entry(block)
            state = raw & BAT_STATE_MASK
            part = qiov.slice(done, n)
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                base = raw & BAT_OFFSET_MASK
                host = base + in_block
                # Coalesce following blocks stored right after this one.
                expected = base + bsize
                while done + n < nbytes:
                    nxt = self.entry(block + 1)
                    if nxt & BAT_STATE_MASK != PAYLOAD_BLOCK_FULLY_PRESENT or \
                            nxt & BAT_OFFSET_MASK != expected:
                        break
                    block += 1
                    expected += bsize
                    n += min(bsize, nbytes - done - n)
                await self._read_data(host, n, qiov.slice(done, n))
            elif state in ABSENT_STATES:
                part.memset(0, n)
            else:
                raise self._bad_state(block, state)
            done += n

    async def _read_data(self, host: int, n: int, part: IOVector) -> None:
        """``n`` bytes of this file at ``host`` into ``part`` (through the
        in-memory replay when there is one)."""
        if self.overlay is not None:
            part.scatter(0, self.overlay.pread(self.file, host, n))
        else:
            await self.file.co_preadv(host, n, part)

    async def writev(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        if self.first_visible_write:
            async with self.lock:
                self._mark_data_write()
        await self._write_blocks(offset, nbytes, qiov)

    def _mark_data_write(self) -> None:
        """Lock held: the session's first guest-visible change rewrites both
        headers with a new DataWriteGuid (once per session)."""
        if self.first_visible_write:
            self.update_headers(True, None)
            self.first_visible_write = False

    def _pieces(self, offset: int, nbytes: int):
        """(done, block, in_block, n): the request split at block boundaries."""
        bsize = self.block_size
        done = 0
        while done < nbytes:
            block, in_block = divmod(offset + done, bsize)
            n = min(bsize - in_block, nbytes - done)
            yield done, block, in_block, n
            done += n

    async def _write_blocks(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        for done, block, in_block, n in self._pieces(offset, nbytes):
            part = qiov.slice(done, n)
            raw = self.entry(block)
            state = raw & BAT_STATE_MASK
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                await self.file.co_pwritev((raw & BAT_OFFSET_MASK) + in_block, n, part)
            elif state in ABSENT_STATES:
                await self._allocating_write(block, in_block, n, part)
            else:
                raise self._bad_state(block, state)

    async def _allocating_write(self, block: int, in_block: int, n: int,
                                part: IOVector) -> None:
        async with self.lock:
            raw = self.entry(block)
            if raw & BAT_STATE_MASK == PAYLOAD_BLOCK_FULLY_PRESENT:   # allocated while we waited
                await self.file.co_pwritev((raw & BAT_OFFSET_MASK) + in_block, n, part)
                return
            await self._allocate_full(block, in_block, n, part)

    def _grow_file(self, nbytes: int) -> int:
        """Extend the file by ``nbytes`` at the next 1 MiB boundary; returns that offset."""
        at = round_up(self.file.getlength(), ALIGNMENT)
        self.file.truncate(at + nbytes)
        return at

    async def _allocate_full(self, block: int, in_block: int, n: int,
                             part: IOVector) -> None:
        """Lock held: give ``block`` a new FULLY_PRESENT block at the end of the
        file holding the guest's ``n`` bytes at ``in_block`` (the rest reads
        zeros), journal its BAT sector, then publish the entry."""
        file = self.file
        new_offset = self._grow_file(self.block_size)
        idx = self.bat.index(block)
        entry = encode_entry(PAYLOAD_BLOCK_FULLY_PRESENT, new_offset).to_bytes(8, "little")
        await file.co_pwritev(new_offset + in_block, n, part)
        self.log_writer.write_and_flush(file, self.bat_offset + idx * 8, entry,
                                        self._set_log_guid)
        # Publish the entry only now that it is durable: until then other
        # requests see the block absent (readers get zeros, writers queue
        # on the lock), so no write can land in -- and no flush can
        # complete over -- a block whose BAT entry is not yet on disk,
        # and a failed allocation has nothing to revert.
        self.bat.set(block, PAYLOAD_BLOCK_FULLY_PRESENT, new_offset)

    def block_status(self, offset: int, nbytes: int):
        """(state, host offset or None, length) for the run starting at offset."""
        bsize = self.block_size
        block, in_block = divmod(offset, bsize)
        raw = self.entry(block)
        state = raw & BAT_STATE_MASK
        n = min(bsize - in_block, nbytes)
        host = (raw & BAT_OFFSET_MASK) + in_block if state == PAYLOAD_BLOCK_FULLY_PRESENT else None
        # Extend over following blocks with the same kind of answer.
        while n < nbytes:
            nxt = self.entry(block + 1)
            nstate = nxt & BAT_STATE_MASK
            if host is not None:
                if (nstate != PAYLOAD_BLOCK_FULLY_PRESENT
                        or (nxt & BAT_OFFSET_MASK) != host + n):
                    break
            elif nstate != state:
                break
            block += 1
            n = min(n + bsize, nbytes)
        return state, host, n

    # ------------------------------------------------------------------ info

    def format_specific(self) -> dict:
        from .constants import guid_str
        counts = self.bat.count_states()
        names = {0: "not-present", 1: "undefined", 2: "zero", 3: "unmapped",
                 5: "unmapped", 6: "fully-present", 7: "partially-present"}
        by_state: dict[str, int] = {}
        for state, count in sorted(counts.items()):
            key = names.get(state, f"state-{state}")
            by_state[key] = by_state.get(key, 0) + count
        h = self.header
        return {
            "subformat": "fixed" if self.fixed else "dynamic",
            "block-size": self.block_size,
            "log-size": h.log_length,
            "logical-sector-size": self.logical_sector_size,
            "physical-sector-size": self.params.physical_sector_size,
            "page83-id": guid_str(self.params.page83),
            "data-write-guid": guid_str(h.data_write_guid),
            "file-write-guid": guid_str(h.file_write_guid),
            "log-pending": self.overlay is not None,
            "creator": self.creator,
            "blocks": by_state,
            **self._parent_info(),
        }

    def _parent_info(self) -> dict:
        locator = self.params.parent_locator if self.differencing else None
        if locator is None:
            return {}
        return {"parent-locator": dict(locator.entries)}


def _table_buffer(nbytes: int):
    """A writable buffer for a table about to be read in whole.

    Above 1 MiB an anonymous mapping: the kernel hands out zero pages lazily,
    where ``bytearray(n)`` first memsets all of it (0.2 s for the 512 MiB BAT
    of a 64 TiB image with 1 MiB blocks) and preadv then touches it again.
    """
    if nbytes <= 1 << 20:
        return bytearray(nbytes)
    import mmap
    return mmap.mmap(-1, nbytes)


def _parse_or(buf, fallback: Header) -> Header:
    """A header slot as parsed, or a copy of the current one if it is invalid
    (qemu overwrites an invalid slot on the first header update)."""
    try:
        return Header.parse(buf)
    except BlockDriverError:
        return Header(**{k: getattr(fallback, k) for k in fallback.__dataclass_fields__})


__all__ = ["VHDXImage"]
