"""The ``file`` protocol: a POSIX file or block device (QEMU's file-posix).

Vectors go to ``preadv``/``pwritev`` untouched; holes are found with
SEEK_DATA/SEEK_HOLE and made with ``fallocate``.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import BlockIOError, InvalidArgumentError, UnsupportedError, from_oserror
from ..hookspecs import hookimpl
from ..iov import IOVector
from ..node import (BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO, O_NO_FLUSH, O_RDWR,
                    WRITE_UNMAP, BlockDriverState, BlockStatus)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_IOV_MAX = 1024

_fallocate = None      # libc's fallocate(2), bound on first use


def _bind_fallocate():
    # ctypes (and the ldconfig run of find_library) only when a command
    # actually punches holes or zeroes ranges: ~5 ms of start-up otherwise.
    global _fallocate
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = getattr(libc, "fallocate", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        fn.restype = ctypes.c_int
        _fallocate = (fn, ctypes.get_errno)
    else:
        _fallocate = False
    return _fallocate


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    bound = _fallocate if _fallocate is not None else _bind_fallocate()
    if not bound:
        raise OSError(errno.ENOTSUP, "fallocate is not available")
    fn, get_errno = bound
    if fn(fd, mode, offset, length) != 0:
        err = get_errno()
        raise OSError(err, os.strerror(err))


class _State:
    __slots__ = ("fd", "path", "is_block", "reopen_fd")

    def __init__(self, fd: int, path: str, is_block: bool) -> None:
        self.fd = fd
        self.path = path
        self.is_block = is_block
        self.reopen_fd: int | None = None


def _path(bs: BlockDriverState) -> str:
    name = bs.filename or ""
    return name[5:] if name.startswith("file:") else name


def _open_fd(path: str, flags: int, create: bool = False) -> int:
    mode = os.O_RDWR if flags & O_RDWR else os.O_RDONLY
    if create:
        mode |= os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, mode | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        err = from_oserror(exc, path)
        if create:      # file-posix's raw_co_create words its own failure
            err.message = f"Could not create '{path}': {err.message}"
        raise err from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        # open(2) of a directory succeeds read-only; file-posix refuses it
        # after its fstat (writable opens fail in open(2) with EISDIR).
        os.close(fd)
        raise InvalidArgumentError(f"'file' driver requires '{path}' to be a regular file",
                                   filename=path)
    return fd


class FileProtocol:
    protocol_name = "file"
    format_name = None

    @hookimpl
    def bdrv_open(self, bs: BlockDriverState, options, flags) -> None:
        path = _path(bs)
        fd = _open_fd(path, flags, create=bool(options.get("create")))
        st = os.fstat(fd)
        is_block = stat.S_ISBLK(st.st_mode)
        bs.opaque = _State(fd, path, is_block)
        bs.total_size = os.lseek(fd, 0, os.SEEK_END) if is_block else st.st_size

    @hookimpl
    def bdrv_close(self, bs: BlockDriverState) -> None:
        s: _State = bs.opaque
        if s is not None and s.fd >= 0:
            os.close(s.fd)
            s.fd = -1

    @hookimpl
    def bdrv_reopen_prepare(self, bs: BlockDriverState, flags: int) -> None:
        bs.opaque.reopen_fd = _open_fd(bs.opaque.path, flags)

    @hookimpl
    def bdrv_reopen_commit(self, bs: BlockDriverState, flags: int) -> None:
        s: _State = bs.opaque
        os.close(s.fd)
        s.fd, s.reopen_fd = s.reopen_fd, None

    @hookimpl
    def bdrv_reopen_abort(self, bs: BlockDriverState, flags: int) -> None:
        s: _State = bs.opaque
        if s.reopen_fd is not None:
            os.close(s.reopen_fd)
            s.reopen_fd = None

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov: IOVector) -> None:
        fd = bs.opaque.fd
        iov = qiov.iov
        try:
            if len(iov) == 1:
                got = os.preadv(fd, iov, offset)
            else:
                got = _preadv_all(fd, iov, offset)
        except OSError as exc:
            raise from_oserror(exc, bs.filename) from None
        if got < nbytes:
            # Short read at end of file: the rest reads as zeros.
            done = got
            while done < nbytes:
                try:
                    n = os.preadv(fd, qiov.slice(done, nbytes - done).iov[:_IOV_MAX],
                                  offset + done)
                except OSError as exc:
                    raise from_oserror(exc, bs.filename) from None
                if n == 0:
                    qiov.memset(done, nbytes - done)
                    break
                done += n

    @hookimpl
    async def bdrv_co_writev(self, bs, offset, nbytes, qiov: IOVector, flags) -> None:
        fd = bs.opaque.fd
        done = 0
        try:
            while done < nbytes:
                iov = qiov.iov if done == 0 else qiov.slice(done, nbytes - done).iov
                n = os.pwritev(fd, iov[:_IOV_MAX], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError as exc:
            raise from_oserror(exc, bs.filename) from None
        if flags & 1 and not bs.open_flags & O_NO_FLUSH:  # WRITE_FUA, unless cache=unsafe
            os.fdatasync(fd)

    @hookimpl
    async def bdrv_co_flush(self, bs) -> None:
        try:
            os.fdatasync(bs.opaque.fd)
        except OSError as exc:
            raise from_oserror(exc, bs.filename) from None

    @hookimpl
    async def bdrv_co_pwrite_zeroes(self, bs, offset, nbytes, flags) -> None:
        s: _State = bs.opaque
        end = offset + nbytes
        try:
            if flags & WRITE_UNMAP and end <= bs.total_size and not s.is_block:
                fallocate(s.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, nbytes)
                return
            if s.is_block:
                raise UnsupportedError("write-zeroes on block devices not supported")
            if offset >= bs.total_size:
                # Beyond EOF: extending the file creates a hole, which reads as zeros.
                os.ftruncate(s.fd, end)
                bs.total_size = end
                return
            fallocate(s.fd, _FALLOC_FL_ZERO_RANGE, offset, nbytes)
            if end > bs.total_size:
                bs.total_size = end
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                raise UnsupportedError("write-zeroes not supported by the host") from None
            raise from_oserror(exc, bs.filename) from None

    @hookimpl
    async def bdrv_co_pdiscard(self, bs, offset, nbytes) -> None:
        s: _State = bs.opaque
        if s.is_block:
            return
        try:
            fallocate(s.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise from_oserror(exc, bs.filename) from None

    @hookimpl
    async def bdrv_co_block_status(self, bs, want_zero, offset, nbytes) -> BlockStatus:
        fd = bs.opaque.fd
        if not want_zero or bs.opaque.is_block:
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes, offset, bs)
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset: hole to EOF
                return BlockStatus(BLOCK_ZERO | BLOCK_OFFSET_VALID, nbytes, offset, bs)
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes, offset, bs)
        if data > offset:
            return BlockStatus(BLOCK_ZERO | BLOCK_OFFSET_VALID,
                               min(nbytes, data - offset), offset, bs)
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = offset + nbytes
        return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID,
                           max(1, min(nbytes, hole - offset)), offset, bs)

    @hookimpl
    async def bdrv_co_truncate(self, bs, offset, exact, prealloc) -> None:
        s: _State = bs.opaque
        if prealloc not in (None, "off", "falloc", "full"):
            # file-posix's message (qemu-img resize --preallocation=metadata)
            raise UnsupportedError(f"Unsupported preallocation mode: {prealloc}")
        if s.is_block:
            if offset > bs.total_size:
                raise UnsupportedError("Cannot grow device files")
            return
        try:
            old = os.fstat(s.fd).st_size
            if prealloc in ("falloc", "full") and offset > old:
                os.posix_fallocate(s.fd, old, offset - old)
                if prealloc == "full":
                    zeros = bytes(1 << 20)
                    pos = old
                    while pos < offset:
                        n = min(offset - pos, len(zeros))
                        os.pwrite(s.fd, memoryview(zeros)[:n], pos)
                        pos += n
            os.ftruncate(s.fd, offset)
            if old == 0 and offset > 0 and prealloc in ("off", "falloc"):
                _allocate_first_block(s.fd, offset)
        except OSError as exc:
            raise from_oserror(exc, bs.filename) from None
        bs.total_size = offset

    @hookimpl
    def bdrv_get_allocated_file_size(self, bs) -> int:
        try:
            return os.fstat(bs.opaque.fd).st_blocks * 512
        except OSError as exc:
            raise from_oserror(exc, bs.filename) from None

    @hookimpl
    def bdrv_has_zero_init(self, bs) -> bool:
        return not bs.opaque.is_block


def _allocate_first_block(fd: int, size: int) -> None:
    """Write zeros over the first block of a file grown from empty, as QEMU's
    file-posix does (so qemu-img and blockdrv leave the same allocation map:
    ``info`` actual-size and ``map`` agree).  Failures are ignored, as there."""
    try:
        os.pwrite(fd, bytes(4096 if size >= 4096 else 512), 0)
    except OSError:
        pass


def _preadv_all(fd: int, iov: list, offset: int) -> int:
    total = 0
    for start in range(0, len(iov), _IOV_MAX):
        part = iov[start:start + _IOV_MAX]
        n = os.preadv(fd, part, offset + total)
        total += n
        if n < sum(len(v) for v in part):
            break
    return total


driver = FileProtocol()
