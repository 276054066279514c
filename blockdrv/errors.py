"""One error tree for the whole block layer.

Every error a user can provoke is a :class:`BlockDriverError` carrying an
``errno``; the CLI turns it into one line on stderr.  Anything else escaping
the library is an internal bug, and is reported as such.

:class:`BlockDriverError` is an ``OSError`` (as ``gzip``'s and ``zipfile``'s
I/O errors are), so code written against files (``except OSError``) handles
images too; ``str()`` is the message alone, ``.errno`` and ``.filename`` are
set.  A host error wrapped by :func:`from_oserror` also keeps the builtin
class its errno has: a missing image is a ``FileNotFoundError``
(:class:`ImageNotFoundError`), a directory an ``IsADirectoryError``, a
refused open a ``PermissionError`` (:class:`HostPermissionError`).  Inside
the library, ``except OSError`` around host calls must therefore let a
``BlockDriverError`` through untouched (``except BlockDriverError: raise``
first), or it would be wrapped twice.

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


class BlockDriverError(OSError):
    """Base of every error raised on purpose by blockdrv: an ``OSError`` whose
    ``str()`` is the message alone (``strerror`` is the message too)."""

    default_errno = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None,
                 filename: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = self.default_errno if errno is None else errno
        self.filename = filename

    # OSError keeps strerror in a slot of its own; here it follows the
    # message (which callers may reword after construction).
    @property
    def strerror(self) -> str:              # type: ignore[override]
        return self.message

    @strerror.setter
    def strerror(self, value: str) -> None:
        self.message = value

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # OSError's own reduce would rebuild from args alone, losing errno
        return (_rebuild, (type(self), self.message, self.errno, self.filename),
                self.__dict__)

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


# Host errors keep the builtin OSError subclass their errno maps to, so
# ``except FileNotFoundError`` works on images as on files.

class ImageNotFoundError(InvalidArgumentError, FileNotFoundError):
    default_errno = _errno.ENOENT


class IsADirectoryImageError(InvalidArgumentError, IsADirectoryError):
    default_errno = _errno.EISDIR


class NotADirectoryImageError(InvalidArgumentError, NotADirectoryError):
    default_errno = _errno.ENOTDIR


class HostPermissionError(ReadOnlyError, PermissionError):
    default_errno = _errno.EACCES


def _rebuild(cls, message, errno, filename):
    return cls(message, errno=errno, filename=filename)


def from_oserror(exc: OSError, filename: str | None = None) -> BlockDriverError:
    """Wrap an ``OSError`` from the host into the matching blockdrv error.

    A :class:`BlockDriverError` (an ``OSError`` too) is returned as it is,
    only given ``filename`` when it has none: never wrapped twice."""
    if isinstance(exc, BlockDriverError):
        return exc.with_filename(filename)
    code = exc.errno or _errno.EIO
    message = exc.strerror or str(exc)
    if code == _errno.ENOENT:
        cls: type[BlockDriverError] = ImageNotFoundError
    elif code == _errno.EISDIR:
        cls = IsADirectoryImageError
    elif code == _errno.ENOTDIR:
        cls = NotADirectoryImageError
    elif code == _errno.EINVAL:
        cls = InvalidArgumentError
    elif code in (_errno.EACCES, _errno.EPERM):
        cls = HostPermissionError
    elif code == _errno.EROFS:
        cls = ReadOnlyError
    elif code == _errno.ENOSPC:
        cls = NoSpaceError
    else:
        cls = BlockIOError
    return cls(message, errno=code, filename=filename or exc.filename)
