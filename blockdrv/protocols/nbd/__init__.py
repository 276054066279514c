"""The ``nbd`` protocol: images served by qemu-nbd, nbdkit or ``blockdrv nbd``.

``blockdrv info nbd+unix:///?socket=/tmp/s.sock``, ``nbd://host:10809/export``
or qemu's legacy ``nbd:unix:/tmp/s.sock:exportname=x`` (see :mod:`.uri`).  The
format is probed over the connection as over a file, so a VHDX served raw
opens as vhdx.  Reads, and block status from ``base:allocation`` when the
server offers it (holes show in ``map`` and ``convert`` skips them); writes,
flush, trim and write-zeroes when the export is writable and the node is
opened read-write.  A network export takes no locks: the server owns the
image (no ``bdrv_check_perm``).

I/O is synchronous on a blocking socket (one request in flight): the hooks
are coroutines that never suspend, so the synchronous CLI and API step them
without an event loop (:mod:`blockdrv.coroutine`); under an event loop they
block it for one round trip.  Open options (``file={...}`` under a format):
``timeout`` (seconds, default 60; 0 waits forever).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ...common import (BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO, O_RDWR, O_UNMAP,
                       WRITE_FUA, WRITE_UNMAP, BlockStatus)
from ...errors import InvalidArgumentError, ReadOnlyError, UnsupportedError
from ...exports.nbd import protocol as P
from ...hookspecs import hookimpl
from ...iov import IOVector
from .uri import SCHEMES

if TYPE_CHECKING:  # pragma: no cover
    from .client import NBDClient


class _State:
    def __init__(self, client: NBDClient) -> None:
        self.client = client
        # the last block-status answer: (start, [(length, nbd flags), ...])
        self.extents: tuple[int, list[tuple[int, int]]] | None = None


def _timeout(options) -> float | None:
    value = options.get("timeout", 60)
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"Invalid timeout '{value}' (seconds expected)") from None
    if t < 0:
        raise InvalidArgumentError(f"Invalid timeout '{value}' (seconds expected)")
    return t or None


def _views(qiov: IOVector, start: int, n: int) -> list[memoryview]:
    return qiov.slice(start, n).iov


def _chunks(nbytes: int, step: int):
    pos = 0
    while pos < nbytes:
        n = min(step, nbytes - pos)
        yield pos, n
        pos += n


class NBDProtocol:
    protocol_name = "nbd"
    format_name = None
    # claimed by blockdrv.block.split_protocol: "nbd+unix://..." opens here
    uri_schemes = SCHEMES

    @hookimpl
    def bdrv_open(self, bs, options, flags) -> None:
        if options.get("create"):
            raise UnsupportedError("The nbd protocol cannot create images: "
                                   "the server provides the export", errno=errno.ENOTSUP)
        # the client (sockets, threads, urllib) only when an nbd image opens
        from .client import NBDClient
        from .uri import parse
        addr = parse(bs.filename or "")
        client = NBDClient(addr, _timeout(options))
        if flags & O_RDWR and client.read_only:
            client.close()
            raise ReadOnlyError("The NBD export is read-only", errno=errno.EACCES)
        bs.opaque = _State(client)
        bs.total_size = client.size
        bs.request_alignment = client.min_block

    @hookimpl
    def bdrv_close(self, bs) -> None:
        st: _State | None = bs.opaque
        if st is not None:
            st.client.close()

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov: IOVector) -> None:
        client = bs.opaque.client
        step = client.max_block
        for pos, n in _chunks(nbytes, step):
            client.read_into(offset + pos, _views(qiov, pos, n))

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov: IOVector, flags) -> None:
        st: _State = bs.opaque
        client = st.client
        st.extents = None
        fua = bool(flags & WRITE_FUA) and client.can(P.FLAG_SEND_FUA)
        for pos, n in _chunks(nbytes, client.max_block):
            client.write(offset + pos, _views(qiov, pos, n), fua)
        if flags & WRITE_FUA and not fua and client.can(P.FLAG_SEND_FLUSH):
            client.flush()

    @hookimpl
    async def bdrv_co_flush(self, bs) -> None:
        client = bs.opaque.client
        if client.can(P.FLAG_SEND_FLUSH):
            client.flush()

    @hookimpl
    async def bdrv_co_pdiscard(self, bs, offset, nbytes) -> None:
        st: _State = bs.opaque
        client = st.client
        if not client.can(P.FLAG_SEND_TRIM) or not bs.open_flags & O_UNMAP:
            return
        st.extents = None
        for pos, n in _chunks(nbytes, 1 << 30):
            client.trim(offset + pos, n)

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs, offset, nbytes, flags) -> None:
        st: _State = bs.opaque
        client = st.client
        if not client.can(P.FLAG_SEND_WRITE_ZEROES):
            raise UnsupportedError("The NBD server cannot write zeroes")
        st.extents = None
        cmd_flags = 0 if flags & WRITE_UNMAP and bs.open_flags & O_UNMAP else P.CMD_FLAG_NO_HOLE
        if flags & WRITE_FUA and client.can(P.FLAG_SEND_FUA):
            cmd_flags |= P.CMD_FLAG_FUA
        for pos, n in _chunks(nbytes, 1 << 30):
            client.write_zeroes(offset + pos, n, cmd_flags)

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        st: _State = bs.opaque
        client = st.client
        if client.context_id is None or not want_zero:
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes, offset, bs)
        found = _cached(st, offset)
        if found is None:
            extents = client.block_status(offset, nbytes)
            st.extents = (offset, extents)
            found = _cached(st, offset)
        length, nbd_flags = found
        # qemu's nbd client: a hole that reads as zeros is the file protocol's
        # hole; a hole without the ZERO bit has unknown content: read it.
        if nbd_flags & P.STATE_ZERO:
            flags = BLOCK_ZERO | BLOCK_OFFSET_VALID
            if not nbd_flags & P.STATE_HOLE:
                flags |= BLOCK_DATA
        else:
            flags = BLOCK_DATA | BLOCK_OFFSET_VALID
        return BlockStatus(flags, max(1, min(length, nbytes, bs.total_size - offset)),
                           offset, bs)

    @hookimpl
    def bdrv_get_allocated_file_size(self, bs) -> int:
        return -1               # unknown, as qemu-img info says "disk size: unavailable"


def _cached(st: _State, offset: int) -> tuple[int, int] | None:
    """(bytes from ``offset`` to the end of its extent, flags) from the last answer."""
    if st.extents is None:
        return None
    pos, extents = st.extents
    for length, flags in extents:
        if pos <= offset < pos + length:
            return pos + length - offset, flags
        pos += length
    return None


driver = NBDProtocol()
