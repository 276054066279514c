"""One NBD export: a node, what the handshake tells about it, and the NBD
commands as calls on the node (QEMU's nbd/server.c does this part over its
block layer; here it is :class:`blockdrv.node.BlockDriverState`).

Every failure a command can meet comes out as :class:`ExportError`, carrying
the NBD errno the client gets and a message for the structured error chunk.
"""

from __future__ import annotations

from blockdrv._startup import dataclass

from ...common import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO, O_UNMAP,
                       WRITE_NO_FALLBACK, WRITE_UNMAP)
from ...errors import BlockDriverError
from ...iov import IOVector
from ...mapping import co_block_status, co_block_status_depth
from ...node import BlockDriverState
from . import protocol as P

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"

# At most this many descriptors in one BLOCK_STATUS chunk (the standard's
# bound is 2^20; clients ask again from where a shorter answer stops).
MAX_EXTENTS = 1 << 16
_CACHE_CHUNK = 4 << 20
_MAX_PIECES = 64            # a read sent from more host extents is read instead
_PLAIN_FORMATS = ("raw", "vhdx")


class ExportError(Exception):
    """A command failed: ``error`` is the NBD errno sent to the client."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


@dataclass
class ExportOptions:
    """What ``blockdrv nbd``'s flags decide about an export."""

    name: str = ""
    description: str | None = None
    shared: int = 1                 # -e: concurrent clients (0: unlimited)
    writethrough: bool = False      # --cache=writethrough/directsync: flush every write
    detect_zeroes: str = "off"      # --detect-zeroes: off | on | unmap
    allocation_depth: bool = False  # -A: offer qemu:allocation-depth


def _wrap(exc: BlockDriverError) -> ExportError:
    return ExportError(P.nbd_errno(exc.errno), exc.message)


def _is_zero(data) -> bool:
    n = len(data)
    return n > 0 and data[0] == 0 and data[n - 1] == 0 and data.count(0) == n


class Export:
    """The node behind one export name."""

    def __init__(self, bs: BlockDriverState, opts: ExportOptions | None = None) -> None:
        self.bs = bs
        self.opts = opts or ExportOptions()
        self.readonly = bs.read_only
        # Reads may be sent from the host file (sendfile) only when nothing
        # can change the mapping under them and the file holds the guest's
        # bytes: a read-only export, every layer a format whose valid host
        # offsets hold plain guest data, straight over a POSIX file (no
        # filter such as blkdebug in between), none dirty (a VHDX log not
        # replayed: block status maps to the stale payload).
        self.send_from_host = self.readonly and self._plain_chain()

    def _plain_chain(self) -> bool:
        node = self.bs
        try:
            while node is not None:
                if node.drv.name not in _PLAIN_FORMATS or node.file is None \
                        or node.file.drv.name != "file" or node.get_info().is_dirty:
                    return False
                node = node.backing
        except (BlockDriverError, AttributeError):
            return False
        return True

    # -- what the handshake says ------------------------------------------------------

    @property
    def name(self) -> str:
        return self.opts.name

    @property
    def size(self) -> int:
        return self.bs.total_size

    def contexts(self) -> list[str]:
        names = [BASE_ALLOCATION]
        if self.opts.allocation_depth:
            names.append(ALLOCATION_DEPTH)
        return names

    def match_contexts(self, queries: list[str], listing: bool) -> list[str]:
        """The contexts ``queries`` select (SET) or list (LIST).  LIST with no
        query lists them all; a namespace alone (``base:``) lists its
        contexts; unknown namespaces and names select nothing."""
        available = self.contexts()
        if listing and not queries:
            return available
        found: list[str] = []
        for query in queries:
            for name in available:
                namespace = name.split(":", 1)[0] + ":"
                if query == name or (listing and query == namespace):
                    if name not in found:
                        found.append(name)
        return found

    def multi_conn(self) -> bool:
        """NBD_FLAG_CAN_MULTI_CONN, as qemu-nbd decides it: on read-only
        exports open to more than one client.  Writable exports do not
        promise it.  All connections share one node, so a FLUSH does cover
        the writes completed on every connection; but multi-conn clients
        stripe one workload over connections, i.e. concurrent writers, and
        the driver contract does not require a format to serialise
        allocating writes against each other -- VHDX updates the BAT through
        its log after the payload, and with its metadata path going async
        those steps interleave between requests.  Without that guarantee
        the flag would be a promise the driver never made."""
        return self.readonly and self.opts.shared != 1

    def transmission_flags(self, structured: bool) -> int:
        flags = (P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA
                 | P.FLAG_SEND_CACHE)
        if self.readonly:
            flags |= P.FLAG_READ_ONLY
        else:
            flags |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        if structured:
            flags |= P.FLAG_SEND_DF           # every read is answered in one chunk
        if self.multi_conn():
            flags |= P.FLAG_CAN_MULTI_CONN
        return flags

    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum): any byte granularity works (the
        node does read-modify-write below its alignment), whole sectors of
        the image are preferred."""
        return 1, max(4096, self.bs.request_alignment), P.MAX_PAYLOAD

    # -- bounds --------------------------------------------------------------------------

    def _check(self, offset: int, length: int, beyond: int = P.EINVAL) -> None:
        if offset + length > self.size:
            raise ExportError(beyond, f"request {offset}+{length} is beyond the end of "
                                      f"the export ({self.size} bytes)")

    def _check_writable(self) -> None:
        if self.readonly:
            raise ExportError(P.EPERM, "export is read-only")

    # -- commands --------------------------------------------------------------------------

    async def read(self, offset: int, buf) -> None:
        """Fill ``buf`` (a writable buffer) from ``offset``."""
        self._check(offset, len(buf))
        if not len(buf):
            return
        try:
            await self.bs.co_preadv(offset, len(buf), IOVector.from_buffer(buf))
        except BlockDriverError as exc:
            raise _wrap(exc) from None

    async def host_extents(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """``[offset, offset + length)`` as (fd, host offset, n) pieces of
        host files (fd -1: zeros) for sendfile(2), or None when some of it
        must be read through the drivers (not a buffered POSIX file, no
        valid host offset, too fragmented)."""
        if not self.send_from_host or length <= 0:
            return None
        self._check(offset, length)
        from ...protocols.file import host_fd
        pieces: list[tuple[int, int, int]] = []
        pos, end = offset, offset + length
        try:
            while pos < end:
                if len(pieces) >= _MAX_PIECES:
                    return None
                st = await co_block_status(self.bs, pos, end - pos, want_zero=False)
                n = min(st.pnum, end - pos)
                if n <= 0:
                    return None
                if st.flags & BLOCK_ZERO and not st.flags & BLOCK_DATA:
                    pieces.append((-1, 0, n))
                elif st.flags & BLOCK_DATA and st.flags & BLOCK_OFFSET_VALID \
                        and st.file is not None and st.file.drv.name == "file":
                    fd = host_fd(st.file)
                    if fd is None:
                        return None
                    pieces.append((fd, st.map, n))
                else:
                    return None
                pos += n
        except BlockDriverError as exc:
            raise _wrap(exc) from None
        return pieces

    async def write(self, offset: int, data, fua: bool) -> None:
        self._check_writable()
        self._check(offset, len(data), P.ENOSPC)
        mode = self.opts.detect_zeroes
        try:
            if mode != "off" and _is_zero(data):
                flags = WRITE_UNMAP if mode == "unmap" and self.bs.open_flags & O_UNMAP else 0
                await self.bs.co_pwrite_zeroes(offset, len(data), flags)
            else:
                await self.bs.co_pwritev(offset, len(data), IOVector.from_buffer(data))
            await self._after_write(fua)
        except BlockDriverError as exc:
            raise _wrap(exc) from None

    async def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool,
                           fast: bool) -> None:
        self._check_writable()
        self._check(offset, length, P.ENOSPC)
        flags = 0
        if not no_hole and self.bs.open_flags & O_UNMAP:
            flags |= WRITE_UNMAP        # may punch a hole, as --discard=unmap allows
        if fast:
            flags |= WRITE_NO_FALLBACK  # cheap or ENOTSUP, never a zero-buffer write
        try:
            await self.bs.co_pwrite_zeroes(offset, length, flags)
            await self._after_write(fua)
        except BlockDriverError as exc:
            raise _wrap(exc) from None

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self._check_writable()
        self._check(offset, length)
        try:
            # Dropped by the node unless --discard=unmap (O_UNMAP).
            await self.bs.co_pdiscard(offset, length)
            await self._after_write(fua)
        except BlockDriverError as exc:
            raise _wrap(exc) from None

    async def flush(self) -> None:
        try:
            await self.bs.co_flush()
        except BlockDriverError as exc:
            raise _wrap(exc) from None

    async def cache(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: read the range once (into the host's page cache,
        and whatever the driver caches), a few MiB at a time."""
        self._check(offset, length)
        import asyncio
        buf = bytearray(min(length, _CACHE_CHUNK))
        pos, end = offset, offset + length
        try:
            while pos < end:
                n = min(end - pos, len(buf))
                await self.bs.co_preadv(pos, n, IOVector.from_buffer(memoryview(buf)[:n]))
                pos += n
                if pos < end:
                    await asyncio.sleep(0)      # let other clients' requests in
        except BlockDriverError as exc:
            raise _wrap(exc) from None

    async def _after_write(self, fua: bool) -> None:
        # FUA, and every write under writethrough caching: durable before the
        # reply.  A flush of the whole node is what every driver offers.
        if fua or self.opts.writethrough:
            await self.bs.co_flush()

    async def extents(self, context: str, offset: int, length: int,
                      req_one: bool) -> list[tuple[int, int]]:
        """Descriptors (length, flags) of ``context`` from ``offset``."""
        if length == 0:
            raise ExportError(P.EINVAL, "block status of an empty range")
        self._check(offset, length)
        out: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        try:
            while pos < end:
                if context == BASE_ALLOCATION:
                    st = await co_block_status(self.bs, pos, end - pos)
                    flags = ((0 if st.flags & BLOCK_DATA else P.STATE_HOLE)
                             | (P.STATE_ZERO if st.flags & BLOCK_ZERO else 0))
                else:
                    st, depth = await co_block_status_depth(self.bs, pos, end - pos)
                    # qemu's numbering: 0 unallocated, 1 this image, 2 its backing...
                    flags = depth + 1 if st.flags & BLOCK_ALLOCATED else 0
                n = st.pnum
                if n <= 0:
                    break
                if out and out[-1][1] == flags:
                    out[-1] = (out[-1][0] + n, flags)
                else:
                    if req_one and out:
                        break
                    if len(out) >= MAX_EXTENTS:
                        break
                    out.append((n, flags))
                pos += n
        except BlockDriverError as exc:
            raise _wrap(exc) from None
        if not out:
            raise ExportError(P.EIO, "no block status for the range")
        return out
