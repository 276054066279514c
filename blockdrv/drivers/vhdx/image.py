"""One open VHDX image (``bs.opaque``): guest reads and writes over the
extent mapper, metadata changes as transactions.

It is assembled from three parts: the :class:`.loader.Layout` read and
validated at open (tables and where they are), the :class:`.headers.
HeaderState` (current header, session GUIDs) and the :class:`.mapper.
ExtentMapper` (guest offsets to extents).

The order of operations follows qemu 7.2 so that the same qemu-io script
leaves byte-identical files with both tools (after normalizing GUIDs,
sequence numbers and checksums):

* open read-write: replay a pending log (spec 2.3.3), then rewrite both
  headers with a fresh FileWriteGuid (spec 2.2.2.1);
* first guest-visible write of the session: rewrite both headers with a new
  DataWriteGuid;
* writes to an unallocated block: see :mod:`.allocate`.

Everything reachable from a ``bdrv_co_*`` hook awaits the ``file`` child (a
protocol may suspend); open, check and reopen are synchronous hooks and run
the same coroutines with :func:`blockdrv.coroutine.run_sync` (no event
loop: nothing suspends, nothing is paid).

Lock discipline: ``self.lock`` (an asyncio.Lock; a flag for synchronous
callers, see :class:`blockdrv.coroutine.CoLock`) is held across every
metadata change -- header updates and transactions -- so concurrent writers
to unallocated blocks cannot allocate twice or interleave log entries.
Reads and in-place writes take no lock: they read one BAT entry (and bitmap
bits), which a transaction publishes only once its log entry is durable, so
a write can never land in a block whose entry is not yet on disk (a later
flush would otherwise return before the data is reachable after a crash).
A read racing an allocation sees the old state; a write racing it re-checks
under the lock and then writes in place.  These rules are exercised by
tests/reliability/test_concurrency.py and tests/unit/vhdx/test_async.py.
"""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING

from blockdrv.coroutine import CoLock
from blockdrv.errors import CorruptImageError
from blockdrv.iov import IOVector

from .aio import blocking
from .constants import ZERO_GUID
from .header import Header
from .loader import Layout, load
from .mapper import BAD, DATA, HOLE, PARENT, ZERO, ExtentMapper, bad_state
from .transaction import Transaction

if TYPE_CHECKING:
    from blockdrv.driver import FileChild


class VHDXImage:
    """Driver state of one node (``bs.opaque``)."""

    def __init__(self, file, read_only: bool, check: bool = False) -> None:
        self.file: FileChild = file           # awaited from coroutines, blocking at open
        self.read_only = read_only
        # Opened by `check` (O_CHECK): BAT problems are reported by check,
        # not refused at open (qemu's BDRV_O_CHECK).
        self.check_mode = check
        self.lock = CoLock()
        self.layout: Layout | None = None
        self.headers = None                   # HeaderState
        self.mapper: ExtentMapper | None = None
        self.bitmaps = None                   # differencing images: SectorBitmaps
        self.log_writer = None
        self.log_replayed_on_open = False
        # Reads of the parent's data (the node's co_read_backing: the core
        # owns the chain), and what runs once the image is validated and
        # before open writes anything (the driver names its parent there).
        self.read_backing = None
        self.on_validated = None
        # Discards and zero writes change block states only when asked for
        # explicitly (open option discard=unmap, see .discard); the payload
        # blocks they freed, reused before the file grows; guest requests
        # in flight (a freed block is reused only when no other one is).
        self.unmap = False
        self.free: list[int] = []           # a heap
        self.free_scanned = False
        self.inflight = 0

    # ------------------------------------------------------------------ open

    def open(self) -> None:
        layout = load(self.file, check_mode=self.check_mode, read_only=self.read_only)
        self.layout = layout
        self.headers = layout.headers
        self.overlay = layout.overlay
        self.region_overlaps = layout.region_overlaps
        self.log_guid_without_entries = layout.log_guid_without_entries
        self.last_file_offset_cap = layout.last_file_offset_cap
        if layout.params.has_parent:
            from .bitmap import SectorBitmaps
            self.bitmaps = SectorBitmaps(layout.bat, self.block_size,
                                         self.logical_sector_size, self.co_read)
        self.mapper = ExtentMapper(layout.bat, self.block_size, self.logical_sector_size,
                                   self.bitmaps)
        if self.on_validated is not None:
            self.on_validated(self)
        if not self.read_only:
            blocking(self._co_start_session())

    async def _co_start_session(self) -> None:
        sequence = 1
        if self.overlay is not None:
            # qemu marks the session's first user-visible write before
            # replaying: both headers get the session FileWriteGuid and a new
            # DataWriteGuid.  The image was validated through the overlay;
            # from here the file holds what the overlay showed.
            from .log import co_apply_overlay
            await self.headers.co_mark_data_write()
            await co_apply_overlay(self.file, self.overlay)
            self.headers.forget_slots()     # a log entry may have written there
            sequence = self.overlay.sequence.sequence_number + 1
            self.overlay = None
            await self.headers.co_update_both(False, ZERO_GUID)
            self.log_replayed_on_open = True
        await self._co_start_writing(sequence)

    async def _co_start_writing(self, sequence: int = 1) -> None:
        """Become writable: a log writer numbering from ``sequence``, and both
        headers rewritten with the session's FileWriteGuid (spec 2.2.2.1)."""
        from .log import LogWriter
        h = self.header
        self.log_writer = LogWriter(h.log_offset, h.log_length, sequence=sequence)
        await self.headers.co_update_both(False, None)

    def start_writing(self) -> None:
        """Reopened read-write (synchronous hook)."""
        blocking(self._co_start_writing())

    # ------------------------------------------------------- layout and state

    @property
    def header(self) -> Header:
        return self.headers.current

    @property
    def params(self):
        return self.layout.params

    @property
    def bat(self):
        return self.layout.bat

    def set_bat(self, bat) -> None:
        """A new table (resize): the layout and the mapper use it from now on."""
        self.layout.bat = self.mapper.bat = bat

    @property
    def bat_offset(self) -> int:
        return self.layout.bat_offset

    @property
    def region_table(self):
        return self.layout.region_table

    @property
    def regions(self) -> list[tuple[int, int]]:
        return self.layout.regions

    @property
    def block_size(self) -> int:
        return self.layout.params.block_size

    @property
    def logical_sector_size(self) -> int:
        return self.layout.params.logical_sector_size

    @property
    def virtual_size(self) -> int:
        return self.layout.params.virtual_size

    @property
    def fixed(self) -> bool:
        return self.layout.params.leave_blocks_allocated

    @property
    def differencing(self) -> bool:
        return self.layout is not None and self.layout.params.has_parent

    def file_length(self) -> int:
        """The file's length, as replayed when a log is replayed only in memory."""
        return self.overlay.length if self.overlay is not None else self.file.getlength()

    def structure_spans(self) -> list[tuple[int, int]]:
        return self.layout.structure_spans()

    def transaction(self) -> Transaction:
        """A journaled metadata update (``async with``; hold ``self.lock``)."""
        return Transaction(self.file, self.log_writer, self.headers, self.bat, self.bat_offset)

    # ---------------------------------------------------------- metadata I/O

    async def co_read(self, offset: int, nbytes: int) -> bytes:
        """Metadata read, through the in-memory replay when there is one."""
        if self.overlay is not None:
            return await self.overlay.co_pread(self.file, offset, nbytes)
        if offset + nbytes > self.file.getlength():
            raise CorruptImageError(
                f"VHDX structure at offset {offset} lies beyond the end of the file")
        return bytes(await self.file.co_pread(offset, nbytes))

    def read(self, offset: int, nbytes: int) -> bytes:
        return blocking(self.co_read(offset, nbytes))

    # ------------------------------------------------------------- guest I/O

    async def readv(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        self.inflight += 1
        try:
            await self._readv(offset, nbytes, qiov)
        finally:
            self.inflight -= 1

    async def _readv(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        one = self.mapper.lookup(offset, nbytes)
        if one is not None and one[1] == nbytes:        # one extent: most requests
            kind = one[0]
            if kind is DATA and self.overlay is None:
                await self.file.co_preadv(one[2], nbytes, qiov)
            elif kind is HOLE or kind is ZERO:
                qiov.memset(0, nbytes)
            else:
                await self._read_extent(kind, offset, nbytes, one[2], qiov)
            return
        done = 0
        for ext in await self.mapper.map(offset, nbytes):
            n = ext.length
            await self._read_extent(ext.kind, offset + done, n, ext.host,
                                    qiov if n == nbytes else qiov.slice(done, n))
            done += n

    async def _read_extent(self, kind: str, offset: int, n: int, host: int | None,
                           part: IOVector) -> None:
        if kind is DATA:
            if self.overlay is None:
                await self.file.co_preadv(host, n, part)
            else:
                part.scatter(0, await self.overlay.co_pread(self.file, host, n))
        elif kind is PARENT:
            await self.read_backing(offset, n, part)
        elif kind is BAD:
            raise self._bad(offset // self.block_size)
        else:
            part.memset(0, n)

    async def writev(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        self.inflight += 1
        try:
            await self._writev(offset, nbytes, qiov)
        finally:
            self.inflight -= 1

    async def _writev(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        if self.headers.first_visible_write:
            async with self.lock:
                await self.headers.co_mark_data_write()
        mapper = self.mapper
        bsize = self.block_size
        done = 0
        while done < nbytes:
            block, in_block = divmod(offset + done, bsize)
            n = min(bsize - in_block, nbytes - done)
            part = qiov if n == nbytes else qiov.slice(done, n)
            host = await mapper.in_place(block, in_block, n)
            if host is None:
                if mapper.block_kind(block)[0] is BAD:
                    raise self._bad(block)
                host = await self._allocating_write(block, in_block, n, part)
            if host is not None:
                await self.file.co_pwritev(host, n, part)
            done += n

    async def _allocating_write(self, block: int, in_block: int, n: int,
                                part: IOVector) -> int | None:
        """Allocate under the lock; the host offset instead when the block
        became writable in place while we waited."""
        from .allocate import allocate
        async with self.lock:
            host = await self.mapper.in_place(block, in_block, n)
            if host is not None:
                return host
            await allocate(self, block, in_block, n, part)
        return None

    def _bad(self, block: int) -> CorruptImageError:
        return bad_state(block, self.bat.raw(block) & 7, self.differencing)

    async def block_status(self, offset: int, nbytes: int):
        """The first extent of ``[offset, offset + nbytes)``, as long as it goes."""
        return (await self.mapper.map(offset, nbytes, first=True))[0]

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
        info = {
            "subformat": "fixed" if self.fixed else "dynamic",
            "block-size": self.block_size,
            "log-size": h.log_length,
            "logical-sector-size": self.logical_sector_size,
            "physical-sector-size": self.params.physical_sector_size,
            "page83-id": guid_str(self.params.page83),
            "data-write-guid": guid_str(h.data_write_guid),
            "file-write-guid": guid_str(h.file_write_guid),
            "log-pending": self.overlay is not None,
            "creator": self.layout.creator,
            "blocks": by_state,
        }
        locator = self.params.parent_locator if self.differencing else None
        if locator is not None:
            info["parent-locator"] = dict(locator.entries)
        return info


__all__ = ["VHDXImage"]
