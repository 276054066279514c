"""``compact``: give a dynamic or differencing VHDX's unused space back
(Optimize-VHD), offline -- see :mod:`blockdrv.drivers.vhdx.compact`.

The image is opened read-write (a dry run: read-only) and locked as qemu
locks it, so an image in use by qemu or another blockdrv process is
refused; a read-only file cannot be opened read-write.  The open option
``discard=unmap`` lets the file protocol punch the holes left below the new
end of the file.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .. import block
from ..common import O_RDWR
from ..errors import BlockDriverError, InvalidArgumentError, UnsupportedError
from .common import open_error, reword


def compact(path: str | os.PathLike, *, fmt: str | None = None, dry_run: bool = False,
            progress: Callable[[float], Any] | None = None):
    """Compact the image at ``path``; returns the driver's
    :class:`~blockdrv.drivers.vhdx.compact.CompactReport`."""
    filename = os.fspath(path)
    if fmt is not None and fmt != "vhdx":
        raise InvalidArgumentError(f"Format '{fmt}' does not support compaction (only vhdx)")
    try:
        bs = block.open_node(filename, fmt, 0 if dry_run else O_RDWR, {"discard": "unmap"})
    except (BlockDriverError, OSError) as exc:
        raise reword(exc, open_error(filename, exc)) from None
    try:
        if bs.drv.format_name != "vhdx":
            raise UnsupportedError(f"Format '{bs.drv.format_name}' does not support "
                                   "compaction (only vhdx)")
        from ..drivers.vhdx.compact import compact as run
        result = run(bs.opaque, dry_run=dry_run, progress=progress)
        bs.flush()
        return result
    finally:
        bs.close()


__all__ = ["compact"]
