"""Generic block status, as QEMU's block/io.c layers it over the drivers.

A driver's ``bdrv_co_block_status`` answers for its own node only.  What a
user sees (``map``, ``compare``, ``convert``) is the answer after the
generic rules QEMU applies on top, reproduced by :func:`co_block_status`:

* ``BLOCK_RAW`` (raw-like formats): ask ``st.file`` at ``st.map`` instead and
  report its answer;
* any range that is ``DATA`` or ``ZERO`` is ``ALLOCATED``;
* a ``DATA`` range with a valid offset into another node is also ``ZERO``
  when that node reads as zeros there (a hole in the host file), and the
  answer is cut where the host file's answer changes;
* ``EOF`` when the range reaches the end of the node;
* a range the node leaves unallocated (neither DATA nor ZERO) is answered by
  its backing node, and so on down the chain (QEMU's
  ``bdrv_block_status_above``); without a backing node, or past its end, it
  reads as zeros.  :func:`co_block_status_depth` also tells which layer
  answered (``qemu-img map``'s ``depth``).

:func:`map_entries` then walks a node like ``qemu-img map`` and merges
adjacent ranges with the same properties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .node import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_EOF, BLOCK_OFFSET_VALID,
                   BLOCK_RAW, BLOCK_ZERO, BlockDriverState, BlockStatus)
from .coroutine import run_sync


async def co_block_status(bs: BlockDriverState, offset: int, nbytes: int,
                          want_zero: bool = True) -> BlockStatus:
    """QEMU's ``bdrv_block_status_above`` for ``bs`` and its backing chain."""
    return (await co_block_status_depth(bs, offset, nbytes, want_zero))[0]


async def co_block_status_depth(bs: BlockDriverState, offset: int, nbytes: int,
                                want_zero: bool = True) -> tuple[BlockStatus, int]:
    """(status, depth): the first layer of the chain that allocates the range
    at ``offset`` (0 = ``bs``), its answer cut to what every layer above
    leaves unallocated."""
    depth, node = 0, bs
    while True:
        st = await _co_block_status_node(node, offset, nbytes, want_zero)
        if st.pnum == 0 or st.flags & BLOCK_ALLOCATED:
            break
        backing = node.backing
        if backing is None:
            # Not allocated here (the node sets ALLOCATED with DATA or ZERO):
            # an unallocated range of a format node with no backing reads zeros.
            if node.file is not None:
                st = st._replace(flags=st.flags | BLOCK_ZERO)
            break
        nbytes = st.pnum
        depth += 1
        if offset >= backing.total_size:
            # past the end of the backing file: zeros
            st = BlockStatus(BLOCK_ZERO, nbytes)
            break
        node = backing
    return st._replace(flags=(st.flags & ~BLOCK_EOF) | _eof(bs, offset, st.pnum)), depth


async def _co_block_status_node(bs: BlockDriverState, offset: int, nbytes: int,
                                want_zero: bool = True) -> BlockStatus:
    """QEMU's ``bdrv_co_block_status`` for ``bs`` alone."""
    st = await bs.co_block_status(offset, nbytes, want_zero)
    if st.pnum == 0:
        return st
    flags, pnum, host, file = st.flags, st.pnum, st.map, st.file
    if flags & BLOCK_RAW:
        if not flags & BLOCK_OFFSET_VALID or file is None:
            return BlockStatus(BLOCK_DATA | BLOCK_ALLOCATED | _eof(bs, offset, pnum), pnum)
        inner = await _file_status(file, host, pnum, want_zero)
        pnum = inner.pnum
        return BlockStatus((inner.flags & ~BLOCK_EOF) | _eof(bs, offset, pnum),
                           pnum, inner.map, inner.file)
    if flags & (BLOCK_DATA | BLOCK_ZERO):
        flags |= BLOCK_ALLOCATED
    if (want_zero and flags & BLOCK_OFFSET_VALID and file is not None and file is not bs
            and flags & BLOCK_DATA and not flags & BLOCK_ZERO):
        inner = await _file_status(file, host, pnum, want_zero)
        if inner.flags & BLOCK_EOF and inner.flags & BLOCK_ZERO:
            flags |= BLOCK_ZERO             # reading beyond the host file: zeros
        else:
            pnum = inner.pnum               # cut where the host's answer changes
            flags |= inner.flags & BLOCK_ZERO
    flags = (flags & ~BLOCK_EOF) | _eof(bs, offset, pnum)
    return BlockStatus(flags, pnum, host, file)


def _eof(bs: BlockDriverState, offset: int, pnum: int) -> int:
    return BLOCK_EOF if offset + pnum >= bs.total_size else 0


async def _file_status(file: BlockDriverState, host: int, nbytes: int,
                       want_zero: bool) -> BlockStatus:
    """Status of a host range; beyond the end of the file reads as zeros."""
    if host >= file.total_size:
        return BlockStatus(BLOCK_ZERO | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID | BLOCK_EOF,
                           nbytes, host, file)
    return await _co_block_status_node(file, host, nbytes, want_zero)


def block_status(bs: BlockDriverState, offset: int, nbytes: int,
                 want_zero: bool = True) -> BlockStatus:
    """Synchronous :func:`co_block_status`."""
    return run_sync(co_block_status(bs, offset, nbytes, want_zero))


@dataclass
class MapEntry:
    """One line of ``qemu-img map``."""

    start: int
    length: int = 0
    data: bool = False
    zero: bool = False
    present: bool = False
    depth: int = 0
    offset: int | None = None
    filename: str | None = None

    def mergeable(self, nxt: "MapEntry") -> bool:
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present, self.filename is None,
                self.offset is None) != (nxt.zero, nxt.data, nxt.depth, nxt.present,
                                         nxt.filename is None, nxt.offset is None):
            return False
        if self.filename is not None and self.filename != nxt.filename:
            return False
        if self.offset is not None and self.offset + self.length != nxt.offset:
            return False
        return True


def get_map_entry(bs: BlockDriverState, offset: int, nbytes: int) -> MapEntry:
    st, depth = run_sync(co_block_status_depth(bs, offset, nbytes))
    has_offset = bool(st.flags & BLOCK_OFFSET_VALID)
    return MapEntry(
        start=offset, length=st.pnum,
        data=bool(st.flags & BLOCK_DATA), zero=bool(st.flags & BLOCK_ZERO),
        present=bool(st.flags & BLOCK_ALLOCATED), depth=depth,
        offset=st.map if has_offset else None,
        filename=(st.file.filename if st.file is not None else None) if has_offset else None)


def map_entries(bs: BlockDriverState, start: int = 0,
                max_length: int | None = None) -> Iterator[MapEntry]:
    """Merged map entries of ``[start, start + max_length)``, as qemu-img map
    walks them (the last entry may have length 0 when the range is empty)."""
    end = bs.total_size
    if max_length is not None:
        end = min(start + max_length, end)
    curr = MapEntry(start=start)
    while curr.start + curr.length < end:
        pos = curr.start + curr.length
        nxt = get_map_entry(bs, pos, end - pos)
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr
        curr = nxt
    yield curr
