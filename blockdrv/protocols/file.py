"""The ``file`` protocol: a POSIX file or block device (QEMU's file-posix).

Vectors go to ``preadv``/``pwritev`` untouched; holes are found with
SEEK_DATA/SEEK_HOLE and made with ``fallocate``.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import (BlockDriverError, InvalidArgumentError, IsADirectoryImageError,
                      UnsupportedError, from_oserror)
from ..hookspecs import hookimpl
from ..iov import IOVector
from ..perm import PERM_ALL, PERM_RESIZE, PERM_WRITE
from . import file_lock
from ..common import (BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO, FILE_PREALLOC_MODES,
                      O_NO_FLUSH, O_NOCACHE, O_RDWR, WRITE_UNMAP, BlockStatus)
from ..node import BlockDriverState

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_IOV_MAX = 1024
# O_DIRECT (cache=none/directsync): offsets, lengths and memory aligned to the
# device's logical block; 4 KiB is valid for every block size up to a page.
_DIRECT_ALIGN = 4096

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



def _bounce(nbytes: int):
    """A page-aligned buffer for O_DIRECT (anonymous memory); mmap is
    imported here, by the cache=none paths only."""
    import mmap
    return mmap.mmap(-1, nbytes)

class _State:
    __slots__ = ("fd", "path", "is_block", "direct", "reopen_fd", "locked", "prev_locked")

    def __init__(self, fd: int, path: str, is_block: bool, direct: bool = False) -> None:
        self.fd = fd
        self.path = path
        self.is_block = is_block
        self.direct = direct
        self.reopen_fd: int | None = None
        self.locked: frozenset[int] = frozenset()   # lock bytes held on ``fd``
        self.prev_locked: frozenset[int] | None = None  # during a permission update


def _path(bs: BlockDriverState) -> str:
    name = bs.filename or ""
    return name[5:] if name.startswith("file:") else name


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _open_fd(path: str, flags: int, create: bool = False) -> int:
    mode = os.O_RDWR if flags & O_RDWR else os.O_RDONLY
    if flags & O_NOCACHE:
        mode |= os.O_DIRECT     # QEMU's cache.direct: the host page cache is bypassed
    if create:
        # No O_TRUNC: an existing file is emptied only once its locks show
        # that nobody else is using it (``_lock_for_create``).
        mode |= os.O_CREAT
    try:
        # O_NONBLOCK: open(2) of a FIFO would otherwise wait forever for a
        # writer; the fstat below refuses it, then the fd is made blocking.
        fd = os.open(path, mode | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO and _is_socket(path):
            raise InvalidArgumentError(f"'file' driver requires '{path}' to be a regular "
                                       "file or a block device (it is a socket)",
                                       filename=path) from None
        err = from_oserror(exc, path)
        if create:      # file-posix's raw_co_create words its own failure
            err.message = f"Could not create '{path}': {err.message}"
        raise err from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        # open(2) of a directory succeeds read-only; file-posix refuses it
        # after its fstat (writable opens fail in open(2) with EISDIR).
        os.close(fd)
        raise IsADirectoryImageError(f"'file' driver requires '{path}' to be a regular file",
                                     filename=path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        # FIFOs and character devices (sockets fail in open(2) above): no
        # image lives there, and reads of a FIFO or a terminal could block.
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else
                "of another type")
        os.close(fd)
        raise InvalidArgumentError(f"'file' driver requires '{path}' to be a regular file "
                                   f"or a block device (it is {kind})", filename=path)
    os.set_blocking(fd, True)
    return fd


def host_fd(bs: BlockDriverState) -> int | None:
    """The descriptor behind a node of this driver, for a server that sends
    its bytes with sendfile(2) (``blockdrv nbd``); None when its reads must
    go through the driver (O_DIRECT: the page cache is not to be used)."""
    s = bs.opaque
    if not isinstance(s, _State) or s.direct or s.fd < 0:
        return None
    return s.fd


class FileProtocol:
    protocol_name = "file"
    format_name = None

    @hookimpl
    def bdrv_open(self, bs: BlockDriverState, options, flags) -> None:
        path = _path(bs)
        create = bool(options.get("create"))
        fd = _open_fd(path, flags, create=create)
        st = os.fstat(fd)
        is_block = stat.S_ISBLK(st.st_mode)
        bs.opaque = s = _State(fd, path, is_block, direct=bool(flags & O_NOCACHE))
        if s.direct:
            bs.request_alignment = _DIRECT_ALIGN
        if create:
            try:
                _lock_for_create(s)
            except BaseException:
                os.close(fd)
                bs.opaque = None
                raise
            st = os.fstat(fd)
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
        # The locks move to the new descriptor before the old one closes, so
        # the image is never unlocked in between (holding never fails: every
        # holder takes shared locks).
        if s.locked:
            file_lock.take(s.reopen_fd, s.locked)
        os.close(s.fd)
        s.fd, s.reopen_fd = s.reopen_fd, None

    @hookimpl
    def bdrv_reopen_abort(self, bs: BlockDriverState, flags: int) -> None:
        s: _State = bs.opaque
        if s.reopen_fd is not None:
            os.close(s.reopen_fd)
            s.reopen_fd = None

    # -- permissions: QEMU-compatible lock bytes (file_lock.py) ---------------

    @hookimpl
    def bdrv_check_perm(self, bs: BlockDriverState, perm: int, shared: int) -> None:
        s: _State = bs.opaque
        if not file_lock.available(s.fd):
            return
        want = file_lock.lock_bytes(perm, shared)
        s.prev_locked = s.locked
        try:
            # Take the union first, so the old permissions stay protected
            # until the new ones are known to be free (QEMU's prepare phase).
            file_lock.take(s.fd, want - s.locked)
            s.locked = s.locked | want
            file_lock.check(s.fd, perm, shared, s.path)
        except BlockDriverError:        # the conflict check's own error: as it is
            self.bdrv_abort_perm_update(bs)
            raise
        except OSError as exc:          # ENOLCK and the like: the host's refusal
            self.bdrv_abort_perm_update(bs)
            raise from_oserror(exc, s.path) from None
        except BaseException:
            self.bdrv_abort_perm_update(bs)
            raise

    @hookimpl
    def bdrv_set_perm(self, bs: BlockDriverState, perm: int, shared: int) -> None:
        s: _State = bs.opaque
        if not file_lock.available(s.fd):
            return
        want = file_lock.lock_bytes(perm, shared)
        _release(s, s.locked - want)
        s.locked = s.locked & want
        s.prev_locked = None

    @hookimpl
    def bdrv_abort_perm_update(self, bs: BlockDriverState) -> None:
        s: _State = bs.opaque
        if s.prev_locked is None:
            return
        _release(s, s.locked - s.prev_locked)
        s.locked, s.prev_locked = s.prev_locked, None

    @hookimpl
    async def bdrv_co_readv(self, bs, offset, nbytes, qiov: IOVector) -> None:
        if bs.opaque.direct:
            # O_DIRECT needs aligned memory: read into a page-aligned bounce
            # buffer.  A short read is the end of the file (a read after it
            # would start unaligned): the rest reads as zeros.
            bounce = _bounce(nbytes)
            try:
                got = os.preadv(bs.opaque.fd, [bounce], offset)
            except OSError as exc:
                raise from_oserror(exc, bs.filename) from None
            qiov.scatter(0, memoryview(bounce)[:got])
            qiov.memset(got, nbytes - got)
            return
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
        if bs.opaque.direct:
            bounce = _bounce(nbytes)            # page-aligned, as O_DIRECT needs
            bounce[:] = qiov.gather(0, nbytes)
            qiov = IOVector.from_buffer(bounce)
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
        except BlockDriverError:        # the block-device refusal above: as it is
            raise
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
        if prealloc is not None and prealloc not in FILE_PREALLOC_MODES:
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


def _release(s: _State, offsets) -> None:
    try:
        file_lock.release(s.fd, offsets)
    except OSError:
        pass        # closing the descriptor releases them in any case


def _lock_for_create(s: _State) -> None:
    """As QEMU's raw_co_create: take write and resize, let nobody else resize,
    check that nobody holds the image, and only then empty the file."""
    if s.is_block:
        return
    try:
        if file_lock.available(s.fd):
            perm = PERM_WRITE | PERM_RESIZE
            shared = PERM_ALL & ~PERM_RESIZE
            s.locked = file_lock.lock_bytes(perm, shared)
            file_lock.take(s.fd, s.locked)
            file_lock.check(s.fd, perm, shared, s.path)
        os.ftruncate(s.fd, 0)
    except BlockDriverError:            # file_lock.check's conflict: as it is
        raise
    except OSError as exc:
        raise from_oserror(exc, s.path) from None


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
