"""The VHDX format driver (MS-VHDX v6.0), hook implementations.

The on-disk structures live one per module (header, region, metadata, bat,
bitmap, log); :mod:`.loader` reads and validates an image at open,
:mod:`.headers` keeps its header pair, :mod:`.mapper` maps guest ranges to
extents, :mod:`.transaction` journals every metadata change (used by
:mod:`.allocate`, :mod:`.resize` and :mod:`.check`), :mod:`.image` ties them
into an open image, :mod:`.create` makes new images exactly as qemu-img 7.2
does, :mod:`.check` audits them.
"""

from __future__ import annotations

from blockdrv.block import create_file
from blockdrv.hookspecs import hookimpl
from blockdrv.common import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_RECURSE,
                             BLOCK_ZERO, O_CHECK, O_RDWR, WRITE_NO_FALLBACK, WRITE_UNMAP,
                             BlockStatus,
                             DriverInfo)
from blockdrv.options import CreateOption

from blockdrv._startup import TYPE_CHECKING

from .constants import BAT_STATE_MASK, FILE_SIGNATURE, PAYLOAD_BLOCK_FULLY_PRESENT
from .mapper import DATA, HOLE, PARENT, ZERO

if TYPE_CHECKING:
    from .image import VHDXImage

_CREATE_KEYS = ("subformat", "block_size", "log_size", "block_state_zero",
                "logical_sector_size", "physical_sector_size", "backing_file", "backing_fmt")


# A present payload block: data at a file offset, and (beyond qemu, whose vhdx
# reports the whole disk as data) host holes inside it show as zeros in map.
_DATA_AT = BLOCK_DATA | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID | BLOCK_RECURSE


class _CreateOpts:
    """``create_opts``, read from :mod:`.create` on first use: importing it
    (~7 ms) would cost every command, most of which create nothing -- and
    registering the driver looks at every attribute (pluggy), so a property
    would not do.  A sequence by hand (``collections.abc.Sequence`` would
    import ``collections`` for every command)."""

    _opts = None

    def _load(self) -> list:
        if self._opts is None:
            from .create import CREATE_OPTS
            self._opts = [CreateOption(o.name, o.type, o.help, o.default) for o in CREATE_OPTS]
        return self._opts

    def __getitem__(self, i):
        return self._load()[i]

    def __len__(self) -> int:
        return len(self._load())

    def __iter__(self):
        return iter(self._load())

    def __contains__(self, item) -> bool:
        return item in self._load()

    def __eq__(self, other) -> bool:
        return self._load() == (other._load() if isinstance(other, _CreateOpts) else other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._load())


class VHDXFormat:
    format_name = "vhdx"
    protocol_name = None
    # rebase -b "": a differencing image cannot lose its parent (engines.rebase)
    can_drop_backing = False

    create_opts = _CreateOpts()

    @hookimpl
    def bdrv_probe(self, buf, filename) -> int:
        return 100 if bytes(buf[:8]) == FILE_SIGNATURE else 0

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        from .image import VHDXImage
        img = VHDXImage(bs.file, read_only=not flags & O_RDWR, check=bool(flags & O_CHECK))
        img.on_validated = lambda img: _name_parent(bs, img)
        img.read_backing = bs.co_read_backing
        # Only an explicit discard=unmap/on turns discards and unmapping zero
        # writes into block states (qemu's vhdx has neither; see .discard).
        img.unmap = str(options.get("discard", "")) in ("unmap", "on")
        bs.opaque = img             # bdrv_check_backing reads the locator from it
        try:
            img.open()
        except BaseException:
            bs.opaque = None
            if bs.backing is not None:
                bs.backing.close()
                bs.backing = None
            raise
        bs.total_size = img.virtual_size
        bs.request_alignment = img.logical_sector_size

    @hookimpl
    def bdrv_close(self, bs) -> None:
        bs.opaque = None

    @hookimpl
    def bdrv_check_backing(self, bs, backing) -> None:
        # Spec 2.6.2.6: a VHDX parent, whose DataWriteGuid is the linkage the
        # child recorded, with the child's logical sector size.
        from .parent import check_parent
        check_parent(bs.opaque, backing, bs.full_backing_file or backing.filename)

    @hookimpl
    def bdrv_reopen_prepare(self, bs, flags) -> None:
        img: VHDXImage = bs.opaque
        if flags & O_RDWR and img.overlay is not None:
            # A log replayed only in memory must reach the disk first; that
            # needs a fresh read-write open, not a flag flip.
            from blockdrv.errors import UnsupportedError
            raise UnsupportedError("Cannot reopen read-write: the image has a pending log; "
                                   "open it read-write to replay it")

    @hookimpl
    def bdrv_reopen_commit(self, bs, flags) -> None:
        img: VHDXImage = bs.opaque
        was_ro = img.read_only
        img.read_only = not flags & O_RDWR
        if was_ro and not img.read_only:
            # The session's header rewrite copies the *other* slot's fields;
            # after a session that renewed the DataWriteGuid the two slots
            # hold different GUIDs, so the first rewrite would make a stale
            # one current until the second lands -- a crash between them
            # orphans every child.  Both slots carry the current GUIDs first.
            cur = img.headers.current
            for h in img.headers.headers:
                h.data_write_guid, h.log_guid = cur.data_write_guid, cur.log_guid
            img.start_writing()

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov) -> None:
        await bs.opaque.readv(offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov, flags) -> None:
        await bs.opaque.writev(offset, nbytes, qiov)

    @hookimpl
    async def bdrv_co_pdiscard(self, bs, offset, nbytes) -> None:
        from .discard import co_unmap, target_state
        img: VHDXImage = bs.opaque
        if img.unmap and target_state(img, False) is not None:
            await co_unmap(img, offset, nbytes, zero_write=False)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs, offset, nbytes, flags) -> None:
        from .discard import co_unmap, target_state
        img: VHDXImage = bs.opaque
        bsize = img.block_size
        cheap = flags & WRITE_UNMAP and img.unmap and target_state(img, True) is not None
        if cheap and flags & WRITE_NO_FALLBACK and (
                offset % bsize or (nbytes % bsize and offset + nbytes < img.virtual_size)):
            cheap = False        # partial blocks would take a zero buffer: not "fast"
        if not cheap:
            from blockdrv.errors import UnsupportedError
            raise UnsupportedError("write-zeroes not supported")   # the core writes zeros
        await co_unmap(img, offset, nbytes, zero_write=True)

    @hookimpl
    async def bdrv_co_truncate(self, bs, offset, exact, prealloc) -> None:
        if bs.opaque.differencing:
            from blockdrv.errors import UnsupportedError
            raise UnsupportedError("Resizing VHDX differencing images is not supported")
        from .resize import truncate
        img: VHDXImage = bs.opaque
        img.free.clear()              # a resize moves the end of the file: gather again
        img.free_scanned = False
        await truncate(bs, offset, exact, prealloc)

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        ext = await bs.opaque.block_status(offset, nbytes)
        kind, n = ext.kind, ext.length
        if kind is DATA:
            return BlockStatus(_DATA_AT, n, ext.host, bs.file)
        if kind is PARENT:
            return BlockStatus(0, n)                  # unallocated: the backing chain decides
        if kind is HOLE:
            return BlockStatus(BLOCK_ZERO, n)          # unallocated, reads as zeros
        if kind is ZERO:
            return BlockStatus(BLOCK_ZERO | BLOCK_ALLOCATED, n)   # explicit ZERO/UNMAPPED
        return BlockStatus(BLOCK_DATA | BLOCK_ALLOCATED, n)      # invalid state: reads fail

    @hookimpl
    def bdrv_get_info(self, bs) -> DriverInfo:
        img: VHDXImage = bs.opaque
        return DriverInfo(cluster_size=img.block_size, is_dirty=img.overlay is not None,
                          format_specific=img.format_specific())

    @hookimpl
    def bdrv_check(self, bs, fix):
        from .check import check_image
        return check_image(bs, bs.opaque, fix)

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        img: VHDXImage = bs.opaque
        if img.differencing:
            return False                  # reads come from the parent
        # As qemu: a dynamic image reads zeros until written; a fixed one
        # (first BAT entry present) reads whatever the file holds.
        if img.bat.total_entries == 0:
            return True
        if img.bat.raw_at(0) & BAT_STATE_MASK == PAYLOAD_BLOCK_FULLY_PRESENT:
            return bs.file.has_zero_init()
        return True

    @hookimpl
    def bdrv_create(self, filename, options) -> None:
        kwargs = {k: options[k] for k in _CREATE_KEYS if k in options}
        size = options.get("size")
        from .create import create_vhdx, plan_vhdx
        from blockdrv.errors import InvalidArgumentError
        backing = kwargs.pop("backing_file", None)
        backing_fmt = kwargs.pop("backing_fmt", None)
        parent = None
        if backing is not None:
            from .create_child import child_options
            parent, kwargs, size = child_options(filename, backing, backing_fmt, size, kwargs)
        elif backing_fmt is not None:
            raise InvalidArgumentError("backing_fmt needs backing_file")
        try:
            if size is None:
                raise InvalidArgumentError("Image creation needs a size parameter")
            plan = {k: v for k, v in kwargs.items() if k != "parent_locator"}
            plan_vhdx(size, differencing="parent_locator" in kwargs, **plan)  # no I/O yet
            file_bs = create_file(filename)
            try:
                create_vhdx(file_bs, size, **kwargs)
                file_bs.flush()
            finally:
                file_bs.close()
        finally:
            if parent is not None:
                parent.close()


    @hookimpl
    async def bdrv_make_empty(self, bs) -> None:
        from .chain import co_make_empty
        await co_make_empty(bs)

    @hookimpl
    async def bdrv_change_backing_file(self, bs, backing_file, backing_fmt, backing) -> None:
        from .chain import co_change_backing_file
        await co_change_backing_file(bs, backing_file, backing_fmt, backing)

    @hookimpl
    def bdrv_measure(self, options, in_bs, size):
        from .chain import measure
        return measure(options, in_bs, size)

def _name_parent(bs, img: "VHDXImage") -> None:
    """Runs inside VHDXImage.open once the image is validated, before any
    write: name the parent from the locator and have the core open it (a
    child must not replay its log, or write at all, over a wrong parent)."""
    if not img.differencing:
        return
    from blockdrv.backing import BackingCandidate, open_backing
    from . import parent as vparent
    locator = img.params.parent_locator
    vparent.validate_locator(locator)
    cands = [BackingCandidate(name, path) for name, path in
             vparent.candidates(bs.filename, locator)]
    bs.backing_format = "vhdx"
    bs.backing_candidates = cands
    override = bs.options.get("backing")
    if override:
        bs.backing_file = bs.full_backing_file = override
    elif cands:
        bs.backing_file, bs.full_backing_file = cands[0].name, cands[0].path
    open_backing(bs)


driver = VHDXFormat()
