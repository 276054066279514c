"""``BlockDriverState``: a node of the block graph and the generic I/O layer.

Drivers stay small because this layer owns what every driver would otherwise
repeat (QEMU's block/io.c): bounds, zero-length requests, alignment to
``request_alignment`` with read-modify-write for unaligned writers, read-only
enforcement, fall-backs for missing callbacks and flushing down the chain.
"""

from __future__ import annotations

import errno
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

from .common import (BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_EOF, BLOCK_OFFSET_VALID, BLOCK_RAW,
                     BLOCK_RECURSE, BLOCK_ZERO, O_FORCE_SHARE, O_NO_FLUSH, O_PROTOCOL, O_RDWR, O_UNMAP, WRITE_FUA,
                     WRITE_NO_FALLBACK, BlockStatus, CheckResult, DriverInfo, SnapshotInfo)
from .coroutine import CoLock, run_sync
from .errors import (BlockDriverError, BlockIOError, InvalidArgumentError,
                     ReadOnlyError, UnsupportedError)
from .iov import IOVector
if TYPE_CHECKING:  # pragma: no cover  (the node needs no registry to run)
    from .plugins import BoundDriver

_ZERO_CHUNK = 1 << 20


class BlockDriverState:
    """One node: a driver, its private state and (for formats) a ``file`` child."""

    def __init__(self, drv: BoundDriver, filename: str | None, flags: int = 0,
                 options: dict[str, Any] | None = None) -> None:
        self.drv = drv
        self.filename = filename
        self.open_flags = flags
        self.options = dict(options or {})
        self.opaque: Any = None
        self.file: BlockDriverState | None = None
        # QEMU's backing child (read-only, owned by this node, opened by
        # blockdrv.backing) and the names `info` prints.  A format names its
        # parent in bdrv_open: backing_file (as recorded), backing_format
        # (None: probe) and, when it records several places, backing_candidates.
        self.backing: BlockDriverState | None = None
        self.backing_file: str | None = None
        self.full_backing_file: str | None = None
        self.backing_format: str | None = None
        self.backing_candidates: list | None = None
        self.total_size = 0
        self.request_alignment = 1
        self.growable = False         # protocol child of a format: may grow on write
        self.probed_raw = False       # format guessed as raw (the CLI warns)
        self.closed = False
        # QEMU's write_gen/flushed_gen: writes completed on this node, and
        # that count as of the last successful flush.  A protocol node whose
        # counts match has nothing to make durable and skips its flush.
        self.write_gen = 0
        self.flushed_gen = 0
        self._rmw_lock: CoLock | None = None
        # Bind the hot hooks once; attribute lookups on the node are cheap.
        self._readv = drv.bdrv_co_readv
        self._writev = drv.bdrv_co_writev

    # -- identity ------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return not self.open_flags & O_RDWR

    @property
    def format_name(self) -> str:
        return self.drv.name

    def __repr__(self) -> str:
        return f"<BlockDriverState {self.drv.name} {self.filename!r} size={self.total_size}>"

    def _error(self, exc: BlockDriverError) -> BlockDriverError:
        return exc.with_filename(self.filename)

    def _check_request(self, offset: int, nbytes: int) -> None:
        if self.closed:
            raise self._error(InvalidArgumentError("I/O on a closed node"))
        if offset < 0 or nbytes < 0:
            raise self._error(InvalidArgumentError(
                f"Invalid request: offset {offset}, length {nbytes}", errno=errno.EIO))
        if offset + nbytes > self.total_size and not self.growable:
            raise self._error(InvalidArgumentError(
                f"Request {offset}+{nbytes} is beyond the end of the image "
                f"({self.total_size} bytes)", errno=errno.EIO))

    def _check_writable(self) -> None:
        if self.read_only:
            raise self._error(ReadOnlyError("Block node is read-only", errno=errno.EPERM))

    # -- reads ---------------------------------------------------------------

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        """Read ``nbytes`` at ``offset`` into ``qiov`` (QEMU's bdrv_co_preadv)."""
        self._check_request(offset, nbytes)
        if nbytes == 0:
            return
        if self.growable and offset + nbytes > self.total_size:
            # Past the end of a growable protocol node reads as zeros.
            inside = max(0, self.total_size - offset)
            qiov.memset(inside, nbytes - inside)
            if inside == 0:
                return
            nbytes, qiov = inside, qiov.slice(0, inside)
        align = self.request_alignment
        if align == 1 or (offset % align == 0 and nbytes % align == 0):
            await self._readv(self, offset, nbytes, qiov)
            return
        # Unaligned: widen to the alignment with bounce buffers for head/tail.
        start = offset - offset % align
        end = -(-(offset + nbytes) // align) * align
        head = bytearray(offset - start)
        tail = bytearray(end - offset - nbytes)
        vec = IOVector([head, *qiov.iov, tail])
        await self._readv(self, start, end - start, vec)

    async def co_pread(self, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        await self.co_preadv(offset, nbytes, IOVector.from_buffer(buf))
        return buf

    async def co_read_backing(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        """For format drivers: read the guest range ``[offset, offset+nbytes)``
        of the backing chain into ``qiov`` -- zeros past the parent's end, and
        zeros when there is no parent (QEMU's reads of unallocated ranges)."""
        backing = self.backing
        inside = 0 if backing is None else max(0, min(nbytes, backing.total_size - offset))
        if inside:
            await backing.co_preadv(offset, inside,
                                    qiov if inside == nbytes else qiov.slice(0, inside))
        if inside < nbytes:
            qiov.memset(inside, nbytes - inside)

    # -- writes --------------------------------------------------------------

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVector,
                         flags: int = 0) -> None:
        """Write ``qiov`` at ``offset`` (QEMU's bdrv_co_pwritev)."""
        self._check_writable()
        self._check_request(offset, nbytes)
        align = self.request_alignment
        if nbytes == 0 and offset % align:
            # As block/io.c: an aligned zero-length write still reaches the
            # driver (qemu's vhdx takes it as the session's first visible
            # write and renews the DataWriteGuid); an unaligned one does not.
            return
        try:
            if align == 1 or (offset % align == 0 and nbytes % align == 0):
                await self._writev(self, offset, nbytes, qiov, flags)
            else:
                await self._rmw_write(offset, nbytes, qiov, flags)
        finally:
            # After the write, as bdrv_co_write_req_finish: a flush that
            # started while it was in flight does not count it as flushed.
            self.write_gen += 1
        if self.growable and offset + nbytes > self.total_size and nbytes:
            self.total_size = offset + nbytes

    async def _rmw_write(self, offset: int, nbytes: int, qiov: IOVector, flags: int) -> None:
        # Serialise read-modify-write cycles so two unaligned writers sharing
        # a sector cannot lose each other's bytes.
        if self._rmw_lock is None:
            self._rmw_lock = CoLock()
        align = self.request_alignment
        start = offset - offset % align
        end = -(-(offset + nbytes) // align) * align
        async with self._rmw_lock:
            head = bytearray(offset - start)
            tail = bytearray(end - offset - nbytes)
            if head:
                block = await self.co_pread(start, align)
                head[:] = block[:len(head)]
            if tail:
                tail_start = end - align
                block = await self.co_pread(tail_start, align)
                tail[:] = block[align - len(tail):]
            vec = IOVector([head, *qiov.iov, tail])
            await self._writev(self, start, end - start, vec, flags)

    async def co_pwrite(self, offset: int, data, flags: int = 0) -> None:
        vec = IOVector.from_buffer(data)
        await self.co_pwritev(offset, vec.size, vec, flags)

    async def co_pwritev_compressed(self, offset: int, nbytes: int, qiov: IOVector) -> None:
        """Write ``qiov`` compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED); the
        driver checks cluster alignment, there is no read-modify-write."""
        self._check_writable()
        self._check_request(offset, nbytes)
        fn = self.drv.bdrv_co_pwritev_compressed
        if fn is None:
            raise self._error(UnsupportedError("Compression not supported for this "
                                               "file format"))
        try:
            await fn(self, offset, nbytes, qiov)
        finally:
            self.write_gen += 1

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int = 0) -> None:
        self._check_writable()
        self._check_request(offset, nbytes)
        if nbytes == 0:
            return
        align = self.request_alignment
        fn = self.drv.bdrv_co_pwrite_zeroes
        if fn is not None and offset % align == 0 and nbytes % align == 0:
            try:
                try:
                    await fn(self, offset, nbytes, flags)
                finally:
                    self.write_gen += 1
                if self.growable and offset + nbytes > self.total_size:
                    self.total_size = offset + nbytes
                return
            except UnsupportedError:
                if flags & WRITE_NO_FALLBACK:
                    raise
        elif flags & WRITE_NO_FALLBACK:
            raise self._error(UnsupportedError("write-zeroes not supported"))
        zeros = bytes(min(nbytes, _ZERO_CHUNK))
        pos = 0
        while pos < nbytes:
            n = min(nbytes - pos, len(zeros))
            await self.co_pwrite(offset + pos, memoryview(zeros)[:n], flags & WRITE_FUA)
            pos += n

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        self._check_writable()
        self._check_request(offset, nbytes)
        if nbytes == 0 or self.drv.bdrv_co_pdiscard is None:
            return
        if not self.open_flags & O_UNMAP:
            # discard=ignore (QEMU's default without BDRV_O_UNMAP): dropped here.
            return
        try:
            await self.drv.bdrv_co_pdiscard(self, offset, nbytes)
        finally:
            self.write_gen += 1

    async def co_flush(self) -> None:
        """Flush this node, then its file child (QEMU flushes down the chain)."""
        if self.closed:
            return
        # cache=unsafe (QEMU's BDRV_O_NO_FLUSH): a format still writes out what
        # it caches; only the protocol's flush to stable storage is skipped.
        # So is a protocol flush with no write completed since the last
        # successful one (QEMU's flushed_gen check): everything it would make
        # durable already is.  This is what keeps an allocating write in
        # writethrough mode at qemu's 7 flushes -- the request's own flush
        # comes right after the journal's last header flush.
        gen = self.write_gen
        if self.drv.bdrv_co_flush is not None:
            if self.file is not None:
                await self.drv.bdrv_co_flush(self)
            elif not self.open_flags & O_NO_FLUSH and self.flushed_gen != gen:
                await self.drv.bdrv_co_flush(self)
        if self.file is not None:
            await self.file.co_flush()
        self.flushed_gen = gen

    async def co_truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        self._check_writable()
        if size < 0:
            raise self._error(InvalidArgumentError("Image size cannot be negative"))
        fn = self.drv.bdrv_co_truncate
        if fn is None:
            # qemu's message (block/io.c), so qemu-io scripts print alike
            raise self._error(UnsupportedError("Image format driver does not support resize"))
        if size % max(self.request_alignment, 1) and not self.growable:
            raise self._error(InvalidArgumentError(
                f"Size must be a multiple of {self.request_alignment} bytes"))
        try:
            await fn(self, size, exact, prealloc)
        finally:
            self.write_gen += 1

    # -- allocation ----------------------------------------------------------

    async def co_block_status(self, offset: int, nbytes: int,
                              want_zero: bool = True) -> BlockStatus:
        """Status of the range at ``offset`` of this node alone (clamped to its
        end): the driver's answer after QEMU's generic rules (block/io.c's
        ``bdrv_co_block_status``), so that every consumer reads it alike:

        * ``BLOCK_RAW``: the answer is ``file``'s at ``map`` (raw-like formats);
        * ``DATA`` or ``ZERO`` means ``ALLOCATED`` in this layer;
        * ``BLOCK_RECURSE`` on ``DATA`` at a valid offset: where ``file`` reads
          as zeros there (a host hole, or past its end) the range is ``ZERO``
          too, and the answer is cut where ``file``'s changes;
        * ``EOF`` when the range reaches the end of the node.

        The backing chain is :func:`blockdrv.mapping.co_block_status`'s."""
        if offset < 0 or offset > self.total_size:
            raise self._error(InvalidArgumentError(f"Invalid offset {offset}"))
        nbytes = min(nbytes, self.total_size - offset)
        if nbytes == 0:
            return BlockStatus(BLOCK_EOF, 0)
        fn = self.drv.bdrv_co_block_status
        if fn is None:
            # QEMU's default: formats are all data; protocols map 1:1.
            if self.file is None:
                st = BlockStatus(BLOCK_DATA | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID,
                                 nbytes, offset, self)
            else:
                st = BlockStatus(BLOCK_DATA | BLOCK_ALLOCATED, nbytes)
            return self._eof(offset, st)
        st = await fn(self, want_zero, offset, nbytes)
        if st.pnum <= 0 or st.pnum > nbytes:
            raise self._error(BlockIOError(
                f"driver {self.drv.name} returned an invalid block status length"))
        flags, pnum, host, file = st.flags, st.pnum, st.map, st.file
        if flags & BLOCK_RAW:
            if not flags & BLOCK_OFFSET_VALID or file is None:
                return self._eof(offset, BlockStatus(BLOCK_DATA | BLOCK_ALLOCATED, pnum))
            inner = await _file_status(file, host, pnum, want_zero)
            return self._eof(offset, inner)
        if flags & (BLOCK_DATA | BLOCK_ZERO):
            flags |= BLOCK_ALLOCATED
        if (want_zero and flags & BLOCK_RECURSE and flags & BLOCK_OFFSET_VALID
                and file is not None and file is not self
                and flags & BLOCK_DATA and not flags & BLOCK_ZERO):
            inner = await _file_status(file, host, pnum, want_zero)
            if inner.flags & BLOCK_EOF and inner.flags & BLOCK_ZERO:
                flags |= BLOCK_ZERO             # reading beyond the host file: zeros
            else:
                pnum = inner.pnum               # cut where the host's answer changes
                flags |= inner.flags & BLOCK_ZERO
        return self._eof(offset, BlockStatus(flags & ~BLOCK_RECURSE, pnum, host, file))

    def _eof(self, offset: int, st: BlockStatus) -> BlockStatus:
        eof = BLOCK_EOF if offset + st.pnum >= self.total_size else 0
        return st._replace(flags=(st.flags & ~BLOCK_EOF) | eof)

    # -- whole-node operations -------------------------------------------------

    def getlength(self) -> int:
        return self.total_size

    def has_zero_init(self) -> bool:
        fn = self.drv.bdrv_has_zero_init
        return bool(fn(self)) if fn is not None else False

    def get_allocated_file_size(self) -> int:
        fn = self.drv.bdrv_get_allocated_file_size
        if fn is not None:
            return fn(self)
        return self.file.get_allocated_file_size() if self.file is not None else 0

    def get_info(self) -> DriverInfo:
        fn = self.drv.bdrv_get_info
        return fn(self) if fn is not None else DriverInfo()

    def snapshot_list(self) -> list[SnapshotInfo] | None:
        """The internal snapshots, or ``None`` when the format has none
        (no ``bdrv_snapshot_list``)."""
        fn = self.drv.bdrv_snapshot_list
        return list(fn(self)) if fn is not None else None

    def check(self, fix: int = 0) -> CheckResult:
        fn = self.drv.bdrv_check
        if fn is None:
            raise self._error(UnsupportedError(
                f"This image format ({self.drv.name}) does not support checks",
                errno=errno.ENOTSUP))
        if fix:
            self._check_writable()
        return fn(self, fix)

    def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write as one transaction; the
        image's locks move with it (a conflict refuses the switch)."""
        from .perm import child_perm
        flags = (self.open_flags & ~O_RDWR) | (0 if read_only else O_RDWR)
        if flags == self.open_flags:
            return
        if flags & O_RDWR and flags & O_FORCE_SHARE:
            raise self._error(InvalidArgumentError(
                "force-share=on can only be used with read-only images"))
        # Children first, down the whole ``file`` chain (format -> filter -> protocol).
        nodes = self._file_chain()
        nodes.reverse()
        below = nodes if self.open_flags & O_PROTOCOL else nodes[:-1]
        perm, shared = child_perm(self.drv, self, flags)
        prepared: list[BlockDriverState] = []
        try:
            for node in nodes:
                if node.drv.bdrv_reopen_prepare is not None:
                    node.drv.bdrv_reopen_prepare(node, flags)
                prepared.append(node)
            checked = _check_perm(below, perm, shared)
        except BaseException:
            for node in reversed(prepared):
                if node.drv.bdrv_reopen_abort is not None:
                    node.drv.bdrv_reopen_abort(node, flags)
            raise
        for node in nodes:
            node_flags = flags | (node.open_flags & O_PROTOCOL)
            if node.drv.bdrv_reopen_commit is not None:
                node.drv.bdrv_reopen_commit(node, node_flags)
            node.open_flags = node_flags
        _set_perm(checked, perm, shared)

    def _file_chain(self) -> list["BlockDriverState"]:
        nodes: list[BlockDriverState] = []
        node: BlockDriverState | None = self
        while node is not None:
            nodes.append(node)
            node = node.file
        return nodes

    def update_perm(self, perm: int, shared: int) -> None:
        """Take ``perm`` on this node and share only ``shared`` with other
        users, down through filters to the protocol that enforces it (QEMU's
        ``bdrv_child_try_set_perm``).  Raises ``PermissionConflictError`` and
        changes nothing when another user's permissions conflict."""
        _set_perm(_check_perm(self._file_chain(), perm, shared), perm, shared)

    def close(self) -> None:
        """Close the driver, then the child.  Idempotent."""
        if self.closed:
            return
        try:
            try:
                if not self.read_only:
                    # As QEMU's bdrv_close: whatever was written is durable after close.
                    run_sync(self.co_flush())
            finally:
                # A failed flush is reported, but the driver still releases
                # what it holds (the file protocol its descriptor).
                if self.drv.bdrv_close is not None:
                    self.drv.bdrv_close(self)
        finally:
            self.closed = True
            try:
                if self.file is not None:
                    self.file.close()
            finally:
                if self.backing is not None:
                    self.backing.close()

    # -- synchronous conveniences (no event loop needed) -----------------------

    def pread(self, offset: int, nbytes: int) -> bytearray:
        return run_sync(self.co_pread(offset, nbytes))

    def preadv(self, offset: int, qiov: IOVector) -> None:
        run_sync(self.co_preadv(offset, qiov.size, qiov))

    def pwrite(self, offset: int, data, flags: int = 0) -> None:
        run_sync(self.co_pwrite(offset, data, flags))

    def pwritev(self, offset: int, qiov: IOVector, flags: int = 0) -> None:
        run_sync(self.co_pwritev(offset, qiov.size, qiov, flags))

    def pwritev_compressed(self, offset: int, qiov: IOVector) -> None:
        run_sync(self.co_pwritev_compressed(offset, qiov.size, qiov))

    def pwrite_zeroes(self, offset: int, nbytes: int, flags: int = 0) -> None:
        run_sync(self.co_pwrite_zeroes(offset, nbytes, flags))

    def pdiscard(self, offset: int, nbytes: int) -> None:
        run_sync(self.co_pdiscard(offset, nbytes))

    def flush(self) -> None:
        run_sync(self.co_flush())

    def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        run_sync(self.co_truncate(size, exact, prealloc))

    def block_status(self, offset: int, nbytes: int, want_zero: bool = True) -> BlockStatus:
        return run_sync(self.co_block_status(offset, nbytes, want_zero))

    def __enter__(self) -> "BlockDriverState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_perm(nodes: list[BlockDriverState], perm: int, shared: int) -> list[BlockDriverState]:
    """Prepare ``perm``/``shared`` on every node that enforces permissions;
    on a conflict undo what was prepared and raise.  Returns the nodes to
    commit with :func:`_set_perm`."""
    checked: list[BlockDriverState] = []
    try:
        for node in nodes:
            if node.drv.bdrv_check_perm is not None:
                node.drv.bdrv_check_perm(node, perm, shared)
                checked.append(node)
    except BaseException:
        for node in reversed(checked):
            node.drv.bdrv_abort_perm_update(node)
        raise
    return checked


def _set_perm(nodes: list[BlockDriverState], perm: int, shared: int) -> None:
    for node in nodes:
        if node.drv.bdrv_set_perm is not None:
            node.drv.bdrv_set_perm(node, perm, shared)


async def _file_status(file: BlockDriverState, host: int, nbytes: int,
                       want_zero: bool) -> BlockStatus:
    """Status of a host range; beyond the end of the file reads as zeros."""
    if host >= file.total_size:
        return BlockStatus(BLOCK_ZERO | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID | BLOCK_EOF,
                           nbytes, host, file)
    return await file.co_block_status(host, nbytes, want_zero)
