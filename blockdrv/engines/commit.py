"""qemu-img commit's engine: write an image's data into its backing file.

``commit(top)`` copies every range allocated in ``top`` -- or, with
``base``, in any layer between ``top`` and ``base`` -- into the parent
(``base``), then empties ``top`` (the format's ``bdrv_make_empty``) unless
``drop``.  As qemu-img(1) says, ``-b`` implies ``-d``: the images between
``base`` and ``top`` are left as they are, and only ``top`` still reads as
before (``base`` now holds what they hold over it).

Order, so that a crash at any point loses nothing the top image showed:

1. everything is opened and checked before the first write: the chain,
   ``base`` in it, ``top``'s format able to empty itself;
2. ``base`` is reopened read-write (its write lock taken, as QEMU's commit
   job takes BLK_PERM_WRITE on it) and grown to ``top``'s size if smaller;
3. a format that binds a child to its parent's identity (``bdrv_check_backing``
   vetoes, as VHDX's parent_linkage) re-links the image right above ``base``
   first (``bdrv_change_backing_file`` with ``base`` writable): it keeps
   accepting ``base`` across the writes;
4. the data is written into ``base``, which is flushed;
5. only then ``top`` is emptied (and flushed); the re-linked image gets its
   final linkage.

Until step 5 the top image still holds its data, and every range ``base``
gets is one the layers above it allocate: the top's view never changes.
"""

from __future__ import annotations

import os
from blockdrv._startup import dataclass
from typing import Any, Callable

from ..common import BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_ZERO
from ..coroutine import run_sync
from ..errors import BlockDriverError, InvalidArgumentError, UnsupportedError
from ..mapping import co_block_status_depth
from ..node import BlockDriverState
from .common import cache_mode, open_source, reword, why

COMMIT_BUFFER = 1 << 20

Progress = Callable[[float], Any]


@dataclass
class CommitResult:
    top: str
    base: str
    bytes_committed: int
    emptied: bool


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.normpath(a) == os.path.normpath(b)


def find_backing(top: BlockDriverState, name: str) -> tuple[BlockDriverState, int]:
    """(node, depth) of the image ``name`` names in ``top``'s backing chain
    (QEMU's bdrv_find_backing_image: by the recorded name, the resolved path
    or the same file)."""
    from ..block import path_combine
    node, depth = top.backing, 1
    while node is not None:
        cands = {node.filename}
        if any(c and (c == name or _same(c, name) or _same(c, path_combine(top.filename, name)))
               for c in cands):
            return node, depth
        node, depth = node.backing, depth + 1
    raise InvalidArgumentError(f"Did not find '{name}' in the backing chain of "
                               f"'{top.filename}'")


def _binds_identity(bs: BlockDriverState) -> bool:
    return bs.drv.bdrv_check_backing is not None and \
        bs.drv.bdrv_change_backing_file is not None


def _relink(above: BlockDriverState, base: BlockDriverState) -> None:
    name = above.full_backing_file or above.backing_file or base.filename
    run_sync(above.drv.bdrv_change_backing_file(above, name, above.backing_format, base))


def commit(filename: str, *, fmt: str | None = None, base: str | None = None,
           drop: bool = False, cache: str | None = None,
           progress: Progress | None = None,
           options: dict[str, Any] | None = None) -> CommitResult:
    """Commit ``filename`` into its parent or into ``base`` (see the module
    docstring).  ``cache`` is the ``-t`` mode of every image written
    (default writeback); ``options`` are open options of the top image
    (tests put blkdebug under it, or name the parent with ``backing``)."""
    mode = cache_mode(cache, "writeback")
    if base is not None:
        drop = True                         # qemu-img(1): -b implies -d
    # Every image is opened read-only and checked first: a read-write open of
    # some formats writes (VHDX's FileWriteGuid).
    top = _open(filename, fmt, mode.flags, options)
    try:
        if top.backing is None:
            raise InvalidArgumentError("Image does not have a backing file")
        if base is None:
            base_bs, base_depth = top.backing, 1
        else:
            base_bs, base_depth = find_backing(top, base)
        above = top
        while above.backing is not base_bs:
            above = above.backing
        if not drop and top.drv.bdrv_make_empty is None:
            raise UnsupportedError(f"Image format '{top.format_name}' cannot be emptied "
                                   "after the commit (use -d to keep its data)")
        if base_bs.drv.bdrv_co_writev is None:
            raise UnsupportedError(f"Cannot commit into '{base_bs.filename}': format "
                                   f"'{base_bs.format_name}' is read-only here")
        if not drop:
            _reopen_rw(top)
        _reopen_rw(base_bs)
        relink = _binds_identity(above)
        if relink and above.read_only:
            _reopen_rw(above)
        if top.total_size > base_bs.total_size:
            _grow(base_bs, top.total_size)
        if relink:
            _relink(above, base_bs)
        done = _copy(top, base_bs, base_depth, mode.writethrough, progress)
        try:
            base_bs.flush()
        except BlockDriverError as exc:
            raise reword(exc, f"Could not flush '{base_bs.filename}': {why(exc)}") from None
        if not drop:
            try:
                run_sync(top.drv.bdrv_make_empty(top))
                top.flush()
            except BlockDriverError as exc:
                raise reword(exc, f"Could not empty {filename}: {why(exc)}") from None
        if relink:
            _relink(above, base_bs)         # the final linkage, no alternate left
        if progress is not None:
            progress(1.0)
        return CommitResult(filename, base_bs.filename, done, not drop)
    finally:
        top.close()


def _open(filename, fmt, flags, options) -> BlockDriverState:
    if not options:
        return open_source(filename, fmt, flags)
    from .. import block
    from .common import open_error
    try:
        return block.open_node(filename, fmt, flags, dict(options))
    except (BlockDriverError, OSError) as exc:
        raise reword(exc, open_error(filename, exc)) from None


def _reopen_rw(bs: BlockDriverState) -> None:
    try:
        bs.reopen(read_only=False)
    except BlockDriverError as exc:
        raise reword(exc, f"Could not reopen '{bs.filename}' read-write: {why(exc)}") from None


def _grow(bs: BlockDriverState, size: int) -> None:
    try:
        bs.truncate(size)
    except BlockDriverError as exc:
        raise reword(exc, f"Top image is larger than its base image, and '{bs.filename}' "
                          f"cannot be resized: {why(exc)}") from None


def _copy(top: BlockDriverState, base: BlockDriverState, base_depth: int,
          writethrough: bool, progress: Progress | None) -> int:
    """Write every range a layer above ``base`` decides into ``base``."""
    total, offset, done = top.total_size, 0, 0
    while offset < total:
        st, depth = run_sync(co_block_status_depth(top, offset, min(total - offset, 1 << 30)))
        n = max(st.pnum, 1)
        above = depth < base_depth
        if above and (st.flags & (BLOCK_ALLOCATED | BLOCK_ZERO)):
            pos = offset
            while pos < offset + n:
                k = min(COMMIT_BUFFER, offset + n - pos)
                try:
                    if st.flags & BLOCK_ZERO and not st.flags & BLOCK_DATA:
                        base.pwrite_zeroes(pos, k)
                    else:
                        base.pwrite(pos, top.pread(pos, k))
                    if writethrough:
                        base.flush()
                except BlockDriverError as exc:
                    raise reword(exc, f"error while committing at byte {pos}: "
                                      f"{why(exc)}") from None
                pos += k
                done += k
                if progress is not None:
                    progress(pos / total)
        offset += n
        if progress is not None:
            progress(offset / total)
    return done
