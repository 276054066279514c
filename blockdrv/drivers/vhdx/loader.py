"""Open time: read and validate an image, nothing written (synchronous).

:func:`load` reads, in order, the file identifier, both headers (the
current one selected, spec 2.2.2.1), a pending log -- replayed *in memory*
first, so that everything after it is validated on the image as it will be
after replay (spec 2.3.3) and a read-write open writes nothing until the
whole image passed --, the region table (the second copy if the first is
bad), the metadata and the BAT, and returns them as a :class:`Layout`.
What may not be opened is refused by :mod:`.validate`'s open check; an open
for ``check`` (O_CHECK) leaves BAT findings to ``check``.

Runs from the synchronous ``bdrv_open`` hook, without an event loop: reads
here block (the protocol's synchronous API).
"""

from __future__ import annotations

from blockdrv._startup import dataclass, field

from blockdrv.errors import CorruptImageError
from blockdrv.iov import IOVector

from .bat import Bat, total_entries
from .constants import (FILE_SIGNATURE, HEADER_SECTION_SIZE, REGION_TABLE1_OFFSET,
                        REGION_TABLE2_OFFSET, REGION_TABLE_SIZE)
from .header import FileIdentifier, Header
from .headers import HeaderState
from .metadata import DiskParameters, MetadataTable, read_metadata
from .region import RegionTable


@dataclass
class Layout:
    """Where everything is, and the tables read at open."""

    creator: str
    headers: HeaderState
    region_table: RegionTable
    metadata_table: MetadataTable
    params: DiskParameters
    bat: Bat
    # (offset, length) of the log, the BAT, the metadata and other regions
    regions: list[tuple[int, int]]
    overlay: object = None                  # the in-memory log replay, if any
    # found for check to report (see .check): overlapping regions (read-only
    # check opens only; any other open refuses them), the LogGuid of a header
    # whose log holds no valid entry (check opens only), and (LastFileOffset,
    # length) when replay grew the file only to what the image references
    region_overlaps: list[str] = field(default_factory=list)
    log_guid_without_entries: bytes | None = None
    last_file_offset_cap: tuple[int, int] | None = None

    @property
    def bat_offset(self) -> int:
        return self.region_table.bat.file_offset

    def structure_spans(self) -> list[tuple[int, int]]:
        """(start, end) of the header section, then of the log and every
        region (those of non-zero length)."""
        return [(0, HEADER_SECTION_SIZE)] + [(s, s + n) for s, n in self.regions if n]


class _Reader:
    """Metadata reads during open, through the in-memory replay once there is one."""

    def __init__(self, file) -> None:
        self.file = file
        self.overlay = None

    def length(self) -> int:
        return self.overlay.length if self.overlay is not None else self.file.getlength()

    def read(self, offset: int, nbytes: int) -> bytes:
        if self.overlay is not None:
            return self.overlay.pread(self.file, offset, nbytes)
        if offset + nbytes > self.file.getlength():
            raise CorruptImageError(
                f"VHDX structure at offset {offset} lies beyond the end of the file")
        return bytes(self.file.pread(offset, nbytes))

    def read_table(self, offset: int, nbytes: int):
        """Like :meth:`read`, into one fresh writable buffer with a single
        preadv (the BAT: no bytes copy beside it)."""
        if self.overlay is not None:
            return bytearray(self.overlay.pread(self.file, offset, nbytes))
        if offset + nbytes > self.file.getlength():
            raise CorruptImageError(
                f"VHDX structure at offset {offset} lies beyond the end of the file")
        buf = _table_buffer(nbytes)
        if nbytes:
            self.file.preadv(offset, IOVector.from_buffer(buf))
        return buf

    def bound_replay(self, referenced_end: int) -> int:
        """Let a pending replay grow the file towards LastFileOffset up to
        ``referenced_end``; returns the (replayed) file length."""
        if self.overlay is not None and self.overlay.capped:
            self.overlay.bound(referenced_end)
        return self.length()


def load(file, *, check_mode: bool, read_only: bool) -> Layout:
    from .validate import refuse_at_open
    r = _Reader(file)
    if file.getlength() < HEADER_SECTION_SIZE:
        if bytes(file.pread(0, min(8, file.getlength()))) != FILE_SIGNATURE:
            raise CorruptImageError("Not a VHDX image: bad file signature")
        raise CorruptImageError("VHDX file is shorter than its header section")
    creator = FileIdentifier.parse(file.pread(0, 520)).creator
    headers = HeaderState.read(file)
    current = headers.current
    no_entries = None
    # The log module (7 dataclasses) only when a log is pending or the image
    # is writable: a read-only open of a clean image is the common case of
    # info, map and convert sources.
    if current.has_log:
        from . import log as vlog
        # LastFileOffset is bounded by what the image references, known only
        # once the regions and the BAT are read (bound_replay).
        try:
            r.overlay = vlog.replay_log_in_memory(file, current, referenced_end=0)
        except vlog.LogWithoutEntriesError:
            # Nothing was journaled under that GUID, so nothing changed:
            # check reports it and `-r all` clears the GUID (spec 2.3.3
            # calls the file corrupt, so every other open refuses it).
            if not check_mode:
                raise
            no_entries = bytes(current.log_guid)
    layout = _load_regions(r, headers, current, creator, check_mode and read_only)
    layout.log_guid_without_entries = no_entries
    ov = layout.overlay
    if ov is not None and ov.capped:
        layout.last_file_offset_cap = (ov.last_file_offset, ov.length)
    if not check_mode:
        refuse_at_open(layout, r.length())
    return layout


def _load_regions(r: _Reader, headers: HeaderState, header: Header, creator: str,
                  count_overlaps: bool) -> Layout:
    length = r.length()
    try:
        rt = RegionTable.parse(r.read(REGION_TABLE1_OFFSET, REGION_TABLE_SIZE))
    except CorruptImageError as first:
        # The two copies are identical by spec; fall back to the second.
        try:
            rt = RegionTable.parse(r.read(REGION_TABLE2_OFFSET, REGION_TABLE_SIZE))
        except CorruptImageError:
            raise first from None
    # A read-only check counts overlapping regions as corruptions; any other
    # open refuses them (writing the log or BAT could then overwrite other
    # metadata, so no repair is attempted either).
    overlaps: list[str] = []
    log_end = header.log_offset + header.log_length
    regions_end = max([log_end] + [e.file_offset + e.length for e in rt.entries])
    length = r.bound_replay(regions_end)
    rt.validate(header.log_offset, header.log_length, file_size=length,
                overlaps=overlaps if count_overlaps else None)
    if header.log_length and header.log_offset + header.log_length > length:
        raise CorruptImageError("VHDX log lies beyond the end of the file")
    meta = rt.metadata
    table, p = read_metadata(lambda off, n: r.read(meta.file_offset + off, n), meta.length,
                             allow_differencing=True)
    bat_rt = rt.bat
    entries = total_entries(p.virtual_size, p.block_size, p.logical_sector_size,
                            differencing=p.has_parent)
    if entries * 8 > bat_rt.length:
        raise CorruptImageError(
            f"VHDX BAT region ({bat_rt.length} bytes) is too small for {entries} entries")
    bat = Bat(r.read_table(bat_rt.file_offset, entries * 8), p.virtual_size, p.block_size,
              p.logical_sector_size, differencing=p.has_parent)
    regions = [(header.log_offset, header.log_length), (bat_rt.file_offset, bat_rt.length),
               (meta.file_offset, meta.length)]
    regions += [(e.file_offset, e.length) for e in rt.entries if e not in (bat_rt, meta)]
    if r.overlay is not None and r.overlay.capped:
        r.bound_replay(max(regions_end, bat.present_end()))
    return Layout(creator, headers, rt, table, p, bat, regions, r.overlay, overlaps)


def _table_buffer(nbytes: int):
    """A writable buffer for a table about to be read in whole.

    Above 1 MiB an anonymous mapping: the kernel hands out zeroed pages,
    where ``bytearray(n)`` first memsets all of it (0.2 s for the 512 MiB BAT
    of a 64 TiB image with 1 MiB blocks) and preadv then touches it again.
    """
    if nbytes <= 1 << 20:
        return bytearray(nbytes)
    import mmap
    # MAP_POPULATE: the pages mapped in one call, not a fault per page while
    # preadv fills them (the 8 MiB BAT of a 1 TiB image: ~4 ms less here)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, nbytes, flags=flags)


__all__ = ["Layout", "load"]
