"""qemu-img rebase's engine: give an image another backing file.

* ``unsafe`` (``-u``): only the recorded parent changes (the format's
  ``bdrv_change_backing_file``); the old parent is not opened.  A format that
  binds a child to its parent's identity (VHDX's parent_linkage) first has
  the new parent judged by its ``bdrv_check_backing`` veto -- the repair of
  a moved or renamed parent (Hyper-V's ``Set-VHD -ParentPath``) -- unless
  ``ignore_id_mismatch`` (Set-VHD's ``-IgnoreIdMismatch``), which takes the
  new parent's identity as it is.
* safe (default): every range the image does not allocate itself and where
  the old chain and the new backing file read differently is copied into the
  image, so the guest view does not change; then the parent is changed.  A
  crash before the last step leaves the image on its old parent with some
  ranges allocated that read as before.
* ``backing=""`` flattens: everything of the old chain is copied in and the
  image loses its parent -- for formats that can have none.  A VHDX
  differencing image cannot (its differencing flag and locator make it
  one, and turning it into a dynamic image is a new image): refused before
  anything is written; ``convert`` makes the flat copy.

The image being rebased must not be the new backing file or in its chain.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..common import BLOCK_ALLOCATED, O_NO_BACKING
from ..coroutine import run_sync
from ..errors import BlockDriverError, InvalidArgumentError, UnsupportedError
from ..node import BlockDriverState
from .common import cache_mode, open_error, reword, why

REBASE_BUFFER = 1 << 20
SECTOR = 512

Progress = Callable[[float], Any]


def _open(filename: str, fmt: str | None, flags: int, options=None) -> BlockDriverState:
    from .. import block
    try:
        return block.open_node(filename, fmt, flags, dict(options or {}))
    except (BlockDriverError, OSError) as exc:
        raise reword(exc, open_error(filename, exc)) from None


def rebase(filename: str, backing: str, *, fmt: str | None = None,
           backing_fmt: str | None = None, unsafe: bool = False,
           ignore_id_mismatch: bool = False, cache: str | None = None,
           src_cache: str | None = None, progress: Progress | None = None,
           options: dict[str, Any] | None = None) -> int:
    """Rebase ``filename`` onto ``backing`` (relative to the image's
    directory; ``""``: no backing file).  Returns the bytes copied into the
    image.  ``options``: open options of the image (tests)."""
    mode = cache_mode(cache, "writeback")
    src_mode = cache_mode(src_cache, "writeback", "source ")
    # Opened read-only: a read-write open of some formats writes (VHDX's
    # FileWriteGuid), and nothing may be written before every check passed.
    flags = mode.flags | (O_NO_BACKING if unsafe else 0)
    from ..block import check_target_not_source, path_combine
    new_path = path_combine(filename, backing) if backing else None
    if new_path is not None and os.path.exists(new_path):
        check_target_not_source(filename, [new_path])
    bs = _open(filename, fmt, flags, options)
    new_bs = None
    try:
        drv = bs.drv
        if drv.bdrv_change_backing_file is None:
            raise UnsupportedError(f"Could not change the backing file to '{backing}': "
                                   f"format '{bs.format_name}' has no backing file")
        if not backing and not getattr(drv.plugin, "can_drop_backing", True):
            raise UnsupportedError(
                f"A {bs.format_name} differencing image cannot lose its parent: "
                f"flattening makes a new image; use 'convert -O {bs.format_name}'")
        if new_path is not None:
            try:
                new_bs = _open(new_path, backing_fmt, src_mode.flags)
            except BlockDriverError:
                if not unsafe or drv.bdrv_check_backing is not None:
                    raise
            if new_bs is not None:
                check_target_not_source(filename, [new_bs])
        copied = 0
        if unsafe and not (new_bs is not None and drv.bdrv_check_backing is not None
                           and not ignore_id_mismatch):
            _reopen_rw(bs)
        if unsafe:
            if new_bs is not None and drv.bdrv_check_backing is not None \
                    and not ignore_id_mismatch:
                bs.full_backing_file = new_path      # the veto names the new parent
                try:
                    drv.bdrv_check_backing(bs, new_bs)
                except BlockDriverError as exc:
                    raise reword(exc, f"{why(exc)}; use --ignore-id-mismatch to link "
                                      "the image to it anyway") from None
                _reopen_rw(bs)
        else:
            _reopen_rw(bs)
            copied = _copy_differences(bs, new_bs, mode.writethrough, progress)
            bs.flush()
        try:
            run_sync(drv.bdrv_change_backing_file(bs, backing, backing_fmt, new_bs))
            bs.flush()
        except BlockDriverError as exc:
            raise reword(exc, f"Could not change the backing file to '{backing}': "
                              f"{why(exc)}") from None
        if progress is not None:
            progress(1.0)
        return copied
    finally:
        try:
            if new_bs is not None:
                new_bs.close()
        finally:
            bs.close()


def _reopen_rw(bs: BlockDriverState) -> None:
    try:
        bs.reopen(read_only=False)
    except BlockDriverError as exc:
        raise reword(exc, f"Could not reopen '{bs.filename}' read-write: {why(exc)}") from None


async def _read_view(node: BlockDriverState | None, offset: int, nbytes: int) -> bytearray:
    """The guest range of ``node``'s chain; zeros past its end or without it."""
    buf = bytearray(nbytes)
    if node is None:
        return buf
    inside = max(0, min(nbytes, node.total_size - offset))
    if inside:
        buf[:inside] = await node.co_pread(offset, inside)
    return buf


def _copy_differences(bs: BlockDriverState, new_bs: BlockDriverState | None,
                      writethrough: bool, progress: Progress | None) -> int:
    """Write into ``bs`` the old chain's data wherever ``bs`` does not
    allocate and the new backing file reads differently (qemu-img rebase's
    loop, in runs of differing sectors)."""
    old = bs.backing
    total, offset, copied = bs.total_size, 0, 0
    align = max(bs.request_alignment, SECTOR)
    while offset < total:
        st = bs.block_status(offset, min(total - offset, REBASE_BUFFER))
        n = max(st.pnum, 1)
        if not st.flags & BLOCK_ALLOCATED:
            try:
                a = run_sync(_read_view(old, offset, n))
                b = run_sync(_read_view(new_bs, offset, n))
            except BlockDriverError as exc:
                raise reword(exc, f"error while reading at byte {offset}: {why(exc)}") \
                    from None
            if a != b:
                for lo, hi in _differing_runs(a, b, align):
                    try:
                        bs.pwrite(offset + lo, memoryview(a)[lo:hi])
                        if writethrough:
                            bs.flush()
                    except BlockDriverError as exc:
                        raise reword(exc, f"error while writing at byte {offset + lo}: "
                                          f"{why(exc)}") from None
                    copied += hi - lo
        offset += n
        if progress is not None:
            progress(offset / total)
    return copied


def _differing_runs(a: bytes, b: bytes, align: int) -> list[tuple[int, int]]:
    """(start, end) runs of ``align``-sized units where ``a`` and ``b`` differ."""
    import numpy as np
    n = len(a)
    units = -(-n // align)
    pad = units * align - n
    x = np.frombuffer(bytes(a) + bytes(pad), np.uint8).reshape(units, align)
    y = np.frombuffer(bytes(b) + bytes(pad), np.uint8).reshape(units, align)
    diff = np.any(x != y, axis=1)
    runs, i = [], 0
    idx = np.flatnonzero(diff)
    if not len(idx):
        return runs
    start = prev = int(idx[0])
    for j in idx[1:].tolist():
        if j != prev + 1:
            runs.append((start * align, min((prev + 1) * align, n)))
            start = j
        prev = j
    runs.append((start * align, min((prev + 1) * align, n)))
    return runs
