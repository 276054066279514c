"""Images as Python file objects: ``blockdrv.open``, as ``gzip.open`` is for
gzip files.

    with blockdrv.open("disk.vhdx") as f:              # the guest's disk, as bytes
        tarfile.open(fileobj=f).extractall("out")
    with blockdrv.open("disk.vhdx", "r+b") as f:       # writable, still fixed-size
        f.seek(1 << 20); f.write(b"data")

The stream is the virtual disk the guest sees (backing chain included),
``size`` bytes long.  A disk does not grow: a write reaching past its end
writes what fits and then fails with ENOSPC, as a block device does, and
``truncate`` is refused.  Every error is an ``OSError`` (blockdrv's
:class:`~blockdrv.errors.BlockDriverError` tree is one) with its errno:
``FileNotFoundError`` for a missing image, ``IsADirectoryError``,
``PermissionError``.  ``seek`` also takes ``os.SEEK_DATA`` and
``os.SEEK_HOLE``, answered from the image's allocation.
"""

from __future__ import annotations

import errno as _errno
import io
import os
from blockdrv._startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

from .common import BLOCK_DATA, BLOCK_ZERO
from .errors import InvalidArgumentError, NoSpaceError, UnsupportedError

#: Buffer of the buffered stream ``open`` returns (``buffering=-1``): larger
#: than io's 8 KiB, as every request costs a trip through the block layer.
DEFAULT_BUFFER_SIZE = 128 * 1024

_READALL_CHUNK = 1 << 20


class ImageSizeFixedError(UnsupportedError, io.UnsupportedOperation):
    """``truncate`` on an image stream: the size of a disk is fixed (resize
    the image with :meth:`blockdrv.Image.resize` instead).  Both a blockdrv
    error and an ``io.UnsupportedOperation``."""

    default_errno = _errno.EINVAL


def seek_data_hole(image, offset: int, whence: int) -> int:
    """``lseek(2)``'s SEEK_DATA / SEEK_HOLE over an image: the first offset
    at or after ``offset`` that holds data (or is a hole; the end of the disk
    counts as one).  Data is what block status reports as DATA and not
    ZERO; unallocated ranges and ranges known to read as zeros (even when
    allocated) are holes, which ``lseek(2)`` allows and sparse copies
    (``cp --sparse``, ``tar -S``) want.  ENXIO when ``offset`` is at or past
    the end, or no data follows it."""
    size = image.size
    if offset < 0 or offset >= size:
        raise InvalidArgumentError("offset beyond the end of the image",
                                   errno=_errno.ENXIO)
    pos = offset
    while pos < size:
        st = image.block_status(pos, size - pos)
        is_data = bool(st.flags & BLOCK_DATA) and not st.flags & BLOCK_ZERO
        if is_data == (whence == os.SEEK_DATA):
            return pos
        pos += max(st.pnum, 1)
    if whence == os.SEEK_HOLE:
        return size
    raise InvalidArgumentError("no data after this offset", errno=_errno.ENXIO)


class ImageIO(io.RawIOBase):
    """An unbuffered binary stream over an open :class:`blockdrv.Image`.

    ``close()`` closes the image (flushed, its locks released) unless
    ``close_image=False``."""

    def __init__(self, image, name: str | None = None, close_image: bool = True) -> None:
        super().__init__()
        self.image = image
        self.name = name if name is not None else image.filename
        self.mode = "rb" if image.readonly else "rb+"
        self._pos = 0
        self._size = image.size
        self._close_image = close_image

    # -- capabilities -----------------------------------------------------------

    def readable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        self._checkClosed()
        return not self.image.readonly

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    @property
    def size(self) -> int:
        return self._size

    # -- position -----------------------------------------------------------------

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        offset = int(offset)
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        elif whence in (getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)):
            pos = seek_data_hole(self.image, offset, whence)
        else:
            raise ValueError(f"invalid whence ({whence})")
        if pos < 0:
            raise InvalidArgumentError("negative seek position")
        self._pos = pos     # past the end is allowed, as for files: reads there are empty
        return pos

    # -- I/O ------------------------------------------------------------------------

    def readinto(self, b) -> int:
        self._checkClosed()
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if n:
            self.image.readinto(self._pos, view[:n])
            self._pos += n
        return n

    def readall(self) -> bytes:
        self._checkClosed()
        out = bytearray()
        while self._pos < self._size:
            out += self.read(min(_READALL_CHUNK, self._size - self._pos))
        return bytes(out)

    def write(self, b) -> int:
        self._checkClosed()
        if self.image.readonly:
            raise io.UnsupportedOperation("write: the image is open read-only")
        view = memoryview(b).cast("B")
        if not len(view):
            return 0
        room = self._size - self._pos
        if room <= 0:
            # a block device's answer: no space left at the end of the disk
            raise NoSpaceError(f"write beyond the end of the image ({self._size} bytes; "
                               "a disk does not grow)", filename=self.name)
        n = min(len(view), room)
        self.image.write(self._pos, view[:n])
        self._pos += n
        return n            # short write at the end; the next one fails

    def truncate(self, size: int | None = None) -> int:
        self._checkClosed()
        raise ImageSizeFixedError("truncate: an image's virtual size is fixed "
                                  "(use blockdrv.Image.resize)", filename=self.name)

    def flush(self) -> None:
        # io.RawIOBase.flush only checks the stream is open; here the image's
        # caches and the host file are flushed too (fsync-like).
        super().flush()
        if not self.image.readonly:
            self.image.flush()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno: an image stream has no descriptor")

    def isatty(self) -> bool:
        self._checkClosed()
        return False

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()         # calls flush()
        finally:
            if self._close_image:
                self.image.close()

    def __repr__(self) -> str:
        state = "closed " if self.closed else ""
        return f"<blockdrv.ImageIO {state}name={self.name!r} mode={self.mode!r}>"


def _parse_mode(mode: str) -> bool:
    """Whether ``mode`` opens for writing; ValueError as ``open()`` gives."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be str, not {type(mode).__name__}")
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rb+"):
        if chars & set("wax"):
            raise ValueError(f"invalid mode: {mode!r} (an image is not created or emptied "
                             "by opening it: use blockdrv.create_image, then mode 'r+b')")
        if "t" in chars:
            raise ValueError(f"invalid mode: {mode!r} (an image is binary; wrap it in "
                             "io.TextIOWrapper for text)")
        raise ValueError(f"invalid mode: {mode!r}")
    if "r" not in chars:
        raise ValueError(f"invalid mode: {mode!r} (must contain 'r')")
    return "+" in chars


def open(path: str | os.PathLike, mode: str = "rb", format: str | None = None, *,
         buffering: int = -1, **options: Any):
    """Open an image as a binary file object (``gzip.open``'s shape).

    ``mode``: ``"rb"`` (default; ``"r"`` is the same) or ``"r+b"`` to write
    too.  ``format`` as :func:`blockdrv.open_image`'s ``fmt`` (probed when
    None); ``options`` go to :func:`blockdrv.open_image` (``force_share``,
    ``discard``...).  Returns an ``io.BufferedReader`` / ``io.BufferedRandom``
    over an :class:`ImageIO` (``buffering=0``: the ``ImageIO`` itself;
    otherwise the buffer size, ``-1`` for :data:`DEFAULT_BUFFER_SIZE`).
    The image is locked while the file is open; closing it flushes the image
    and releases the locks.
    """
    writable = _parse_mode(mode)
    if not isinstance(buffering, int) or buffering < -1:
        raise ValueError(f"invalid buffering: {buffering!r}")
    from .api import open_image
    # (a writable image probed as raw warns as open_image does: ProbedRawWarning)
    image = open_image(path, format, readonly=not writable, **options)
    try:
        raw = ImageIO(image, name=os.fspath(path))
        if buffering == 0:
            return raw
        size = DEFAULT_BUFFER_SIZE if buffering == -1 else max(buffering, 1)
        return io.BufferedRandom(raw, size) if writable else io.BufferedReader(raw, size)
    except BaseException:
        image.close()
        raise
