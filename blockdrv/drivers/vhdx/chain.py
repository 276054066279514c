"""Chain operations of a VHDX image: emptying a differencing image
(``bdrv_make_empty``, for commit), pointing it at another parent
(``bdrv_change_backing_file``, for rebase and commit) and measuring a
new image (``bdrv_measure``).

Every change here is journaled (:mod:`.transaction`): after a power cut the
image shows all of an update or none of it.

Parent identity.  A VHDX child is bound to its parent's DataWriteGuid
(``parent_linkage``, spec 2.6.2.6.3), which the parent renews at its first
data write of a session.  Commit writes into the parent, so that child
would stop matching it -- between the parent's renewal and the child's
re-linking a crash would leave a child no reader accepts.  So when the new
parent is open read-write, :func:`co_change_backing_file` first chooses the
parent's next DataWriteGuid and journals it in the child as
``parent_linkage2`` (the spec's alternate linkage), and only then makes it
the parent's DataWriteGuid (both headers, flushed): at every point the
child accepts the parent on disk.
"""

from __future__ import annotations

from blockdrv.errors import InvalidArgumentError, UnsupportedError

from . import parent as vparent
from .constants import ALIGNMENT, LOG_SECTOR_SIZE, new_guid, round_up

_PER_SECTOR = LOG_SECTOR_SIZE // 8          # BAT entries in one 4 KiB sector


def _host_path(name: str) -> str:
    """The file a name reaches: itself, or a filter's child
    (``blkdebug:CONFIG:PATH`` -> PATH): what a locator can record."""
    from blockdrv.block import split_protocol
    proto, rest = split_protocol(name)
    return rest if proto == "file" else rest.rsplit(":", 1)[-1]


def _child_path(bs) -> str:
    return _host_path(bs.filename or "")


# ------------------------------------------------------------------ empty

async def co_make_empty(bs) -> None:
    """Every payload block NOT_PRESENT and every sector bitmap block freed
    (NOT_PRESENT): the image reads its parent everywhere.  In as few
    transactions as the log holds (each BAT sector changes whole, and any
    subset of them is a valid image whose reads are the parent's where it
    changed -- which commit has made equal to this image's data); then the
    file is cut after its last structure."""
    img = bs.opaque
    if not img.differencing:
        raise UnsupportedError("Only VHDX differencing images can be emptied "
                               "(a dynamic or fixed image has no parent to read from)")
    import numpy as np
    async with img.lock:
        entries = np.frombuffer(img.bat.to_bytes(), dtype="<u8")
        changed = np.flatnonzero(entries != 0)
        sectors = sorted({int(i) // _PER_SECTOR for i in changed})
        step = 1
        while step < len(sectors) and img.log_writer.entry_fits(step * 2, step * 2):
            step *= 2
        for pos in range(0, len(sectors), step):
            group = set(sectors[pos:pos + step])
            async with img.transaction() as tx:
                for i in changed:
                    if int(i) // _PER_SECTOR in group:
                        tx.set_bat(int(i), 0)
                if img.bitmaps is not None:
                    tx.on_commit(img.bitmaps._cache.clear)
        if len(changed):
            end = round_up(max(e for _, e in img.structure_spans()), ALIGNMENT)
            if end < img.file.getlength():
                await img.file.co_truncate(end)
            await img.file.co_flush()


# ------------------------------------------------------------- re-parent

async def co_change_backing_file(bs, backing_file: str, backing_fmt, backing) -> None:
    """Point the child at ``backing_file``: relative_path (and
    absolute_win32_path where the path has one) and parent_linkage = the
    parent's DataWriteGuid, read from ``backing`` (opened here when None).
    A read-write ``backing`` gets its next DataWriteGuid registered first
    (module docstring)."""
    img = bs.opaque
    if not img.differencing:
        raise UnsupportedError("A dynamic or fixed VHDX image cannot be given a parent "
                               "(only differencing images have a parent locator)")
    if backing_fmt not in (None, "vhdx"):
        raise InvalidArgumentError(f"A VHDX differencing image needs a vhdx parent, "
                                   f"not {backing_fmt}")
    from blockdrv.block import open_node, path_combine
    child_path = _child_path(bs)
    path = path_combine(child_path, _host_path(backing_file))
    opened = None
    if backing is None:
        opened = backing = open_node(path, "vhdx", 0, {"file": {"driver": "file"}})
    try:
        if backing.format_name != "vhdx":
            raise InvalidArgumentError(f"A VHDX differencing image needs a vhdx parent, "
                                       f"not {backing.format_name}")
        pimg = backing.opaque
        if pimg.logical_sector_size != img.logical_sector_size:
            raise InvalidArgumentError(
                f"VHDX parent '{path}' has {pimg.logical_sector_size}-byte logical "
                f"sectors, this image {img.logical_sector_size} (they must be equal)")
        if pimg.overlay is not None:
            raise InvalidArgumentError(f"VHDX parent '{path}' has a pending log; open it "
                                       "read-write once to replay it first")
        guid = pimg.header.data_write_guid
        headers = pimg.headers
        upcoming = None
        if not backing.read_only and headers.first_visible_write:
            upcoming = new_guid()
        locator = vparent.build_locator(child_path, path, guid, linkage2=upcoming)
        async with img.lock:
            await vparent.co_write_locator(img, locator)
        if upcoming is not None:
            async with pimg.lock:
                if headers.first_visible_write:
                    for h in headers.headers:
                        h.data_write_guid = upcoming
                    await headers.co_update_both(False, None)
                    headers.first_visible_write = False
    finally:
        if opened is not None:
            opened.close()
    bs.backing_file = backing_file
    bs.full_backing_file = path
    bs.backing_format = "vhdx"


# ---------------------------------------------------------------- measure

def measure(options: dict, in_bs, size: int | None) -> dict[str, int]:
    """File sizes of a new VHDX image (as ``create``/``convert`` lay it out):
    ``fully-allocated`` with every payload block allocated, ``required``
    with a block for each one ``in_bs`` holds data in (block status DATA and
    not ZERO).  A fixed image with ``block_state_zero=off`` is its length
    whatever is written.
    Convert allocates whole blocks at the end of the file (1 MiB aligned),
    so these bound what it writes."""
    from .create import plan_vhdx
    kwargs = {k: options[k] for k in ("subformat", "block_size", "log_size",
                                      "block_state_zero", "logical_sector_size",
                                      "physical_sector_size") if options.get(k) is not None}
    if options.get("backing_file"):
        raise UnsupportedError("Measuring a VHDX differencing image is not supported")
    if in_bs is not None:
        size = in_bs.total_size
    layout = plan_vhdx(size, **kwargs)
    bsize = layout.block_size
    blocks = -(-layout.virtual_size // bsize)
    if layout.fixed and not layout.block_state_zero:
        return {"required": layout.file_length, "fully-allocated": layout.file_length}
    # Dynamic images (and fixed ones whose blocks start in the ZERO state,
    # qemu's default) get a new block at the 1 MiB aligned end of the file
    # for each block first written.
    base = round_up(layout.file_length, ALIGNMENT)
    full = base + blocks * bsize
    if in_bs is None:
        return {"required": base, "fully-allocated": full}
    used = _data_blocks(in_bs, bsize)
    return {"required": base + used * bsize, "fully-allocated": full}


def _data_blocks(bs, bsize: int) -> int:
    """Blocks of ``bs``'s guest view holding anything but zeros."""
    from blockdrv.common import BLOCK_DATA, BLOCK_ZERO
    from blockdrv.mapping import block_status
    count, offset, total = 0, 0, bs.total_size
    last = -1
    while offset < total:
        st = block_status(bs, offset, total - offset)
        n = max(st.pnum, 1)
        if st.flags & BLOCK_DATA and not st.flags & BLOCK_ZERO:
            first, end = offset // bsize, (offset + n - 1) // bsize
            count += end - max(first, last + 1) + 1 if end > last else 0
            last = max(last, end)
        offset += n
    return count


__all__ = ["co_make_empty", "co_change_backing_file", "measure"]
