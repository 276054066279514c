"""One error tree for the whole block layer.

Every error a user can provoke is a :class:`BlockDriverError` carrying an
``errno``; the CLI turns it into one line on stderr.  Anything else escaping
the library is an internal bug, and is reported as such.

* :class:`InvalidArgumentError` -- the caller asked for something impossible
  (bad size, unknown option, out-of-range I/O).
* :class:`CorruptImageError`    -- the image on disk violates its format.
* :class:`UnsupportedError`     -- valid, but uses a feature we do not implement.
* :class:`BlockIOError`         -- the layer below failed (EIO, ENOSPC, ...).
* :class:`ReadOnlyError`        -- a write was attempted on a read-only node.
* :class:`PermissionConflictError` -- another process holds the image.
"""

from __future__ import annotations

import errno as _errno


class BlockDriverError(Exception):
    """Base of every error raised on purpose by blockdrv."""

    default_errno = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None,
                 filename: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = self.default_errno if errno is None else errno
        self.filename = filename

    def __str__(self) -> str:
        return self.message

    def with_filename(self, filename: str | None) -> "BlockDriverError":
        """Attach ``filename`` unless one is already known; returns self."""
        if self.filename is None and filename is not None:
            self.filename = filename
        return self


class InvalidArgumentError(BlockDriverError):
    default_errno = _errno.EINVAL


class CorruptImageError(BlockDriverError):
    """The image is structurally invalid (QEMU reports these as EINVAL)."""

    default_errno = _errno.EINVAL


class UnsupportedError(BlockDriverError):
    default_errno = _errno.ENOTSUP


class BlockIOError(BlockDriverError):
    default_errno = _errno.EIO


class ReadOnlyError(BlockDriverError):
    default_errno = _errno.EACCES


class PermissionConflictError(BlockDriverError):
    """Another user of the image (usually another process) holds a permission
    this open needs, or needs one this open would take away (QEMU's lock
    errors: ``Failed to get "write" lock``)."""

    default_errno = _errno.EAGAIN


class NoSpaceError(BlockIOError):
    default_errno = _errno.ENOSPC


def from_oserror(exc: OSError, filename: str | None = None) -> BlockDriverError:
    """Wrap an ``OSError`` from the host into the matching blockdrv error."""
    code = exc.errno or _errno.EIO
    message = exc.strerror or str(exc)
    if code in (_errno.ENOENT, _errno.EISDIR, _errno.ENOTDIR, _errno.EINVAL):
        cls: type[BlockDriverError] = InvalidArgumentError
    elif code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        cls = ReadOnlyError
    elif code == _errno.ENOSPC:
        cls = NoSpaceError
    else:
        cls = BlockIOError
    return cls(message, errno=code, filename=filename or exc.filename)
