"""Block status over a backing chain, and qemu-img map's walk over it.

Each node's own answer, with QEMU's generic rules applied (raw forwarding,
ALLOCATED, RECURSE into host holes, EOF), is
:meth:`blockdrv.node.BlockDriverState.co_block_status`.  Here a range the
node leaves unallocated (neither DATA nor ZERO) is answered by its backing
node, and so on down the chain (QEMU's ``bdrv_block_status_above``); without
a backing node, or past its end, it reads as zeros.
:func:`co_block_status_depth` also tells which layer answered (``qemu-img
map``'s ``depth``).

:func:`map_entries` then walks a node like ``qemu-img map`` and merges
adjacent ranges with the same properties.
"""

from __future__ import annotations

from blockdrv._startup import TYPE_CHECKING, dataclass

if TYPE_CHECKING:
    from typing import Iterator

from .common import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_EOF, BLOCK_OFFSET_VALID, BLOCK_ZERO,
                     BlockStatus)
from .node import BlockDriverState
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
        st = await node.co_block_status(offset, nbytes, want_zero)
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
    eof = BLOCK_EOF if offset + st.pnum >= bs.total_size else 0
    return st._replace(flags=(st.flags & ~BLOCK_EOF) | eof), depth


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
