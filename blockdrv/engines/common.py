"""What the engines share: opening sources, cache modes, rewording errors.

Engine errors are :class:`~blockdrv.errors.BlockDriverError` whose message
already says where and why (qemu-img's wording, e.g. ``Could not open 'x':
...`` or ``error while writing at byte N: ...``), so they carry no separate
``filename``: the CLI prints the message as it is.
"""

from __future__ import annotations

import errno as _errno
import os
from blockdrv._startup import NamedTuple

from .. import block
from ..common import O_NOCACHE, O_NO_FLUSH
from ..errors import BlockDriverError, InvalidArgumentError, from_oserror
from ..node import BlockDriverState


def reword(exc: BaseException, message: str,
           cls: type[BlockDriverError] | None = None) -> BlockDriverError:
    """``exc`` (a block error or a host ``OSError``) as a block error saying
    ``message``, of class ``cls`` or else of the same kind: the errno
    survives, so callers can still tell ENOSPC from EIO."""
    if isinstance(exc, OSError) and not isinstance(exc, BlockDriverError):
        exc = from_oserror(exc)
    if not isinstance(exc, BlockDriverError):
        return (cls or BlockDriverError)(message)
    return (cls or type(exc))(message, errno=exc.errno)


def why(exc: BaseException) -> str:
    """The user-facing reason of a library or host error."""
    if isinstance(exc, BlockDriverError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def open_reason(filename: str, exc: BlockDriverError | OSError) -> str:
    """Why opening ``filename`` failed, worded as qemu's block layer: an
    error of the host's open(2) comes wrapped in file-posix's own "Could
    not open" (qemu-img and qemu-io both print it after their own prefix)."""
    text = why(exc)
    code = getattr(exc, "errno", None) or _errno.EIO
    if text == os.strerror(code):
        text = f"Could not open '{getattr(exc, 'filename', None) or filename}': {text}"
    return text


def open_error(filename: str, exc: BlockDriverError | OSError) -> str:
    """qemu-img's "Could not open" line for a failed open."""
    return f"Could not open '{filename}': {open_reason(filename, exc)}"


def open_source(filename: str, fmt: str | None, flags: int) -> BlockDriverState:
    """Open an image an engine reads or writes; a failure is one error
    worded as qemu-img's.  Goes through ``block.open_node`` looked up at call
    time, so whoever watches the block layer's opens sees the engines'."""
    try:
        return block.open_node(filename, fmt, flags)
    except (BlockDriverError, OSError) as exc:
        raise reword(exc, open_error(filename, exc)) from None


# -- cache modes -------------------------------------------------------------------


class CacheMode(NamedTuple):
    """A ``-t`` cache mode, as bdrv_parse_cache_mode splits it."""

    flags: int              # O_NO_FLUSH for unsafe, O_NOCACHE (O_DIRECT) for none/directsync
    writethrough: bool      # flush after every write
    direct: bool            # O_DIRECT (BDRV_O_NOCACHE): none/off, directsync


_CACHE_MODES = {
    "none": CacheMode(O_NOCACHE, False, True), "off": CacheMode(O_NOCACHE, False, True),
    "directsync": CacheMode(O_NOCACHE, True, True),
    "writeback": CacheMode(0, False, False),
    "unsafe": CacheMode(O_NO_FLUSH, False, False),
    "writethrough": CacheMode(0, True, False),
}

CACHE_MODES = tuple(_CACHE_MODES)


def parse_cache_mode(text: str) -> CacheMode | None:
    """qemu's bdrv_parse_cache_mode; ``None`` for an unknown mode (each
    command words its own error)."""
    return _CACHE_MODES.get(text)


def cache_mode(text: str | None, default: str, what: str = "") -> CacheMode:
    """A cache mode argument of an engine (``None``/empty: ``default``);
    qemu-img convert's message for an unknown one."""
    mode = parse_cache_mode(text or default)
    if mode is None:
        raise InvalidArgumentError(f"Invalid {what}cache option: {text}")
    return mode
