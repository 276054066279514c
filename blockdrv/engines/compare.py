"""qemu-img compare's engine (img_compare): where two images first differ.

Both images are walked by block status together: ranges both report as
zero are equal without reading, ranges allocated on one side only must read
as zeros there, the rest is read and compared in 2 MiB pieces.  As in
qemu-img, a size difference alone does not make the images different --
the longer image's extra part must read as zeros -- unless ``strict``, where
the sizes and the block status must match too.
"""

from __future__ import annotations

import os
from blockdrv._startup import dataclass
from typing import Any, Callable

from ..common import BLOCK_ALLOCATED, BLOCK_ZERO, O_FORCE_SHARE
from ..errors import BlockDriverError, BlockIOError
from ..iov import buffer_is_zero
from ..node import BlockDriverState
from ..mapping import block_status
from .common import open_source, reword, why

IO_BUF_SIZE = 2 << 20
SECTOR = 512

Progress = Callable[[float], Any]


class CompareReadError(BlockIOError):
    """Reading one of the images failed (qemu-img compare exits 4)."""


class CompareStatusError(BlockIOError):
    """The block status of one of the images could not be read (exit 3)."""


@dataclass(frozen=True)
class CompareResult:
    """What :func:`img_compare` found.

    ``mismatch`` is None when the images read the same, else ``"content"``
    (data differs at ``offset``, a multiple of 512), or, in strict mode,
    ``"size"`` (the sizes differ; ``offset`` is None) or ``"block-status"``
    (allocation differs at ``offset``).  ``size_mismatch`` with identical
    content is qemu-img's "Warning: Image size mismatch!" case.
    """

    size1: int
    size2: int
    mismatch: str | None = None
    offset: int | None = None

    @property
    def identical(self) -> bool:
        return self.mismatch is None

    @property
    def size_mismatch(self) -> bool:
        return self.size1 != self.size2


class _Differ(Exception):
    """Unwinds the walk at the first difference."""

    def __init__(self, mismatch: str, offset: int | None) -> None:
        super().__init__(mismatch)
        self.mismatch, self.offset = mismatch, offset


def _read(bs: BlockDriverState, name: str, offset: int, nbytes: int) -> bytearray:
    try:
        return bs.pread(offset, nbytes)
    except BlockDriverError as exc:
        raise reword(exc, f"Error while reading offset {offset} of {name}: {why(exc)}",
                     CompareReadError) from None


def _status(bs: BlockDriverState, name: str, offset: int, nbytes: int):
    try:
        return block_status(bs, offset, nbytes)
    except BlockDriverError as exc:
        raise reword(exc, f"Sector allocation test failed for {name}",
                     CompareStatusError) from None


def _first_sector(buf1, buf2=None) -> int:
    """Offset of the first 512-byte sector where ``buf1`` differs from
    ``buf2`` (from zeros without it).  Only called once the memcmp fast
    paths found a difference: numpy (~40 ms to import) locates it."""
    import numpy as np
    a = np.frombuffer(buf1, dtype=np.uint8)
    mask = a if buf2 is None else a != np.frombuffer(buf2, dtype=np.uint8)
    return int(np.flatnonzero(mask)[0]) // SECTOR * SECTOR


def _check_empty(bs: BlockDriverState, name: str, offset: int, nbytes: int) -> None:
    buf = _read(bs, name, offset, nbytes)
    if not buffer_is_zero(buf):
        raise _Differ("content", offset + _first_sector(buf))


def img_compare(bs1: BlockDriverState, bs2: BlockDriverState, name1: str, name2: str,
                strict: bool = False, progress: Progress | None = None) -> CompareResult:
    """Compare two open images; ``name1``/``name2`` word the errors."""
    size1, size2 = bs1.total_size, bs2.total_size
    done, total = 0, max(size1, size2)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and n:
            progress(done / total)

    if progress is not None:
        progress(0.0)
    try:
        if strict and size1 != size2:
            raise _Differ("size", None)
        offset, common = 0, min(size1, size2)
        while offset < common:
            st1 = _status(bs1, name1, offset, size1 - offset)
            st2 = _status(bs2, name2, offset, size2 - offset)
            chunk = min(st1.pnum, st2.pnum)
            if strict and st1.flags != st2.flags:
                raise _Differ("block-status", offset)
            alloc1, alloc2 = st1.flags & BLOCK_ALLOCATED, st2.flags & BLOCK_ALLOCATED
            if st1.flags & BLOCK_ZERO and st2.flags & BLOCK_ZERO:
                pass
            elif alloc1 == alloc2:
                if alloc1:
                    chunk = min(chunk, IO_BUF_SIZE)
                    buf1 = _read(bs1, name1, offset, chunk)
                    buf2 = _read(bs2, name2, offset, chunk)
                    if buf1 != buf2:
                        raise _Differ("content", offset + _first_sector(buf1, buf2))
            else:
                chunk = min(chunk, IO_BUF_SIZE)
                if alloc1:
                    _check_empty(bs1, name1, offset, chunk)
                else:
                    _check_empty(bs2, name2, offset, chunk)
            offset += chunk
            advance(chunk)
        # the longer image's extra part must read as zeros
        over, name = (bs1, name1) if size1 > size2 else (bs2, name2)
        while offset < total:
            st = _status(over, name, offset, total - offset)
            chunk = st.pnum
            if st.flags & BLOCK_ALLOCATED and not st.flags & BLOCK_ZERO:
                chunk = min(chunk, IO_BUF_SIZE)
                _check_empty(over, name, offset, chunk)
            offset += chunk
            advance(chunk)
    except _Differ as diff:
        return CompareResult(size1, size2, diff.mismatch, diff.offset)
    if progress is not None and not total:
        progress(1.0)
    return CompareResult(size1, size2)


def compare(a, b, *, fmt_a: str | None = None, fmt_b: str | None = None,
            strict: bool = False, force_share: bool = False,
            progress: Progress | None = None) -> CompareResult:
    """Open ``a`` and ``b`` read-only and compare them; see :func:`blockdrv.compare`."""
    name1, name2 = os.fspath(a), os.fspath(b)
    flags = O_FORCE_SHARE if force_share else 0
    bs1 = open_source(name1, fmt_a, flags)
    try:
        bs2 = open_source(name2, fmt_b, flags)
        try:
            return img_compare(bs1, bs2, name1, name2, strict, progress)
        finally:
            bs2.close()
    finally:
        bs1.close()
